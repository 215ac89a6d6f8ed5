import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  detectRealLookingPhi,
  isDiallableNanp,
  isIssuableSsn,
  isPlausibleCardNumber,
  isReservedEmailDomain,
  isWellFormedMbi,
  scanText,
  US_SSN_SYSTEM,
} from '../src/phi/phi-detector.ts';
import { HTEST, startHarness, testPatient, type Harness } from './support/harness.ts';
import { SYNTHEA_DIR } from './support/synthea.ts';

// The sandbox PHI detector (docs/phi-boundary.md): HTEST-labelled values that look real are refused
// in sandbox projects, with the element's path and kind and never the value; production projects
// (which need a BAA) take them.

/** A random SSN that SSA could have issued (area 001-899 but 666, group 01-99, serial 0001-9999). */
function issuableSsn(rnd = Math.random): string {
  let area = 1 + Math.floor(rnd() * 899);
  if (area === 666) area = 667;
  const group = 1 + Math.floor(rnd() * 99);
  const serial = 1 + Math.floor(rnd() * 9999);
  return `${String(area).padStart(3, '0')}-${String(group).padStart(2, '0')}-${String(serial).padStart(4, '0')}`;
}

/**
 * A random North American number that could be dialled (a valid area code; an exchange neither 555
 * nor N11; any line): real-looking phone numbers are built at run time, never written out.
 */
function diallablePhone(rnd = Math.random) {
  const areas = [201, 212, 303, 415, 503, 617, 702, 808, 919, 978];
  const area = String(areas[Math.floor(rnd() * areas.length)]);
  let exchange = '';
  while (exchange === '' || exchange === '555' || exchange.endsWith('11'))
    exchange = `${2 + Math.floor(rnd() * 8)}${Math.floor(rnd() * 10)}${Math.floor(rnd() * 10)}`;
  const line = String(Math.floor(rnd() * 10000)).padStart(4, '0');
  return { area, exchange, line, digits: `${area}${exchange}${line}`, dashed: `${area}-${exchange}-${line}` };
}
const PHONE = diallablePhone();
const PHONE2 = diallablePhone();
const LOCAL = `${PHONE.exchange}${PHONE.line}`;

/** An SSN of the given parts, nine digits: real-looking values are built here, never written out. */
function ssnOf(area: number, group: number, serial: number): string {
  return `${String(area).padStart(3, '0')}${String(group).padStart(2, '0')}${String(serial).padStart(4, '0')}`;
}

describe('the rules, value by value', () => {
  test('SSNs: area 000, 666 and 900-999, group 00 and serial 0000 pass; issuable numbers do not', () => {
    for (const fictional of ['000-12-3456', '666-12-3456', '900-12-3456', '999-01-0001', '987-65-4320'])
      assert.equal(isIssuableSsn(fictional.replace(/-/g, '')), false, fictional);
    const [area, group, serial] = issuableSsn().split('-').map(Number) as [number, number, number];
    assert.equal(isIssuableSsn(ssnOf(area, 0, serial)), false, 'group 00');
    assert.equal(isIssuableSsn(ssnOf(area, group, 0)), false, 'serial 0000');
    assert.equal(isIssuableSsn(ssnOf(1, 1, 1)), true, 'the lowest issuable number');
    assert.equal(isIssuableSsn(ssnOf(899, 99, 9999)), true, 'the highest issuable number');
    for (let i = 0; i < 200; i++) {
      const ssn = issuableSsn();
      assert.equal(isIssuableSsn(ssn.replace(/-/g, '')), true, ssn);
    }
    assert.equal(isIssuableSsn('12345678'), false, 'eight digits are not an SSN');
  });

  test('phones: 555 exchanges and the 555 area code pass; a real area code with another exchange does not', () => {
    for (const fictional of ['5550100', '5550199', '2025550143', '6175551234', '5559784581', '15559784581'])
      assert.equal(isDiallableNanp(fictional), false, fictional);
    // Structurally impossible: area codes starting 0/1, N11, N9X, 37X, 96X; exchanges starting 0/1 or N11.
    for (const impossible of ['1234567890', `017${LOCAL}`, `411${LOCAL}`, `291${LOCAL}`, `371${LOCAL}`])
      assert.equal(isDiallableNanp(impossible), false, impossible);
    for (const impossible of [
      `961${LOCAL}`,
      `${PHONE.area}123${PHONE.line}`,
      `${PHONE.area}911${PHONE.line}`,
      PHONE.digits.slice(0, 8),
      `${PHONE.digits}00`,
    ])
      assert.equal(isDiallableNanp(impossible), false, impossible);
    for (const real of [
      PHONE.digits,
      `1${PHONE.digits}`,
      PHONE2.digits,
      `800${PHONE2.exchange}${PHONE2.line}`,
      LOCAL,
    ])
      assert.equal(isDiallableNanp(real), true, real);
  });

  test('e-mail: RFC 2606 / 6761 reserved domains pass; others do not', () => {
    for (const d of [
      'example.com',
      'EXAMPLE.org',
      'mail.example.net',
      'clinic.example',
      'x.test',
      'a.invalid',
      'localhost',
      'h.localhost',
    ])
      assert.equal(isReservedEmailDomain(d), true, d);
    for (const d of [
      'gmail.com',
      'example.edu',
      'examples.com',
      'notexample.com',
      'hospital.org',
      'test.com',
    ])
      assert.equal(isReservedEmailDomain(d), false, d);
  });

  test('MBIs: the CMS format is refused; letters CMS never uses (S, L, O, I, B, Z) break it', () => {
    assert.equal(isWellFormedMbi('1EG4TE5MK73'), true);
    assert.equal(isWellFormedMbi('1SG4TE5MK73'), false);
    assert.equal(isWellFormedMbi('0EG4TE5MK73'), false);
    assert.equal(isWellFormedMbi('1EG4TE5MK7'), false);
  });

  test('payment cards: Luhn-valid numbers with an issuer prefix are refused; published test numbers pass', () => {
    assert.equal(isPlausibleCardNumber('4539148803436467'), true);
    assert.equal(isPlausibleCardNumber('4539148803436468'), false, 'Luhn check fails');
    assert.equal(isPlausibleCardNumber('4111111111111111'), false, 'a published test number');
    assert.equal(isPlausibleCardNumber('9539148803436460'), false, 'no issuer prefix');
  });

  test('free text: formatted SSNs and phone numbers, keyworded bare digits, e-mail addresses', () => {
    assert.deepEqual(scanText(`SSN ${issuableSsn()} on file`), ['ssn']);
    assert.deepEqual(scanText(`ss# ${issuableSsn().replace(/-/g, '')}`), ['ssn']);
    assert.deepEqual(scanText('test SSN 999-45-6789'), []);
    assert.deepEqual(
      scanText(`order ${issuableSsn().replace(/-/g, '')}`),
      [],
      'bare nine digits without a keyword are not an SSN',
    );
    assert.deepEqual(scanText(`call (${PHONE.area}) ${PHONE.exchange}-${PHONE.line} after 5`), ['phone']);
    assert.deepEqual(scanText('call (617) 555-0123 after 5'), []);
    assert.deepEqual(scanText(`mobile: ${PHONE.digits}`), ['phone']);
    assert.deepEqual(scanText('write to jane.roe@gmail.com'), ['email']);
    assert.deepEqual(scanText('write to jane.roe@example.com'), []);
    assert.deepEqual(
      scanText('2019-05-31T12:00:00-04:00, 185349003, urn:uuid:e925b0f3-8006-43f6-aa31-94bd215e55e7'),
      [],
    );
    assert.deepEqual(scanText('Visa 4539 1488 0343 6467'), ['payment-card']);
  });
});

describe('the detector on resources', () => {
  test('findings name the element path and the kind, never the value', () => {
    const ssn = issuableSsn();
    const findings = detectRealLookingPhi({
      resourceType: 'Patient',
      identifier: [
        { system: 'urn:example:mrn', value: 'MRN-1' },
        { system: US_SSN_SYSTEM, value: ssn.replace(/-/g, '') },
      ],
      telecom: [
        { system: 'phone', value: '555-0100' },
        { system: 'phone', value: `+1 (${PHONE.area}) ${PHONE.exchange}-${PHONE.line}` },
        { system: 'email', value: 'zzyzx@gmail.com' },
      ],
      contact: [{ telecom: [{ system: 'phone', value: `${PHONE.area}.${PHONE.exchange}.${PHONE.line}` }] }],
      text: { status: 'generated', div: `<div xmlns="http://www.w3.org/1999/xhtml">SSN ${ssn}</div>` },
    });
    assert.deepEqual(findings, [
      { path: 'Patient.identifier[1].value', kind: 'ssn', where: 'identifier' },
      { path: 'Patient.telecom[1].value', kind: 'phone', where: 'telecom' },
      { path: 'Patient.telecom[2].value', kind: 'email', where: 'telecom' },
      { path: 'Patient.contact[0].telecom[0].value', kind: 'phone', where: 'telecom' },
      { path: 'Patient.text.div', kind: 'ssn', where: 'text' },
    ]);
    assert.ok(!JSON.stringify(findings).includes(ssn.slice(-4)));
  });

  test('notes, contained resources and text attachments are read; directory phone numbers are not PHI', () => {
    const note = Buffer.from(`Daughter: ${PHONE.dashed}, jane@yahoo.com`).toString('base64');
    const findings = detectRealLookingPhi({
      resourceType: 'DocumentReference',
      status: 'current',
      content: [{ attachment: { contentType: 'text/plain; charset=utf-8', data: note } }],
      contained: [
        { resourceType: 'Organization', telecom: [{ system: 'phone', value: PHONE2.digits }] },
        { resourceType: 'RelatedPerson', telecom: [{ system: 'phone', value: PHONE2.digits }] },
      ],
    });
    assert.deepEqual(
      findings.map((f) => `${f.path} ${f.kind}`),
      [
        'DocumentReference.content[0].attachment.data phone',
        'DocumentReference.content[0].attachment.data email',
        'DocumentReference.contained[1].telecom[0].value phone',
      ],
    );
  });

  test('a sample of Synthea patients passes (their SSNs are 999-xx, phones 555-xxx-xxxx)', (t) => {
    if (!fs.existsSync(SYNTHEA_DIR)) return t.skip(`${SYNTHEA_DIR} not present`);
    const files = fs
      .readdirSync(SYNTHEA_DIR)
      .filter((f) => f.endsWith('.json'))
      .sort()
      .filter((_, i) => i % 10 === 0);
    let resources = 0;
    for (const f of files) {
      const bundle = JSON.parse(fs.readFileSync(path.join(SYNTHEA_DIR, f), 'utf8')) as {
        entry: { resource: Record<string, unknown> }[];
      };
      for (const e of bundle.entry) {
        resources++;
        assert.deepEqual(detectRealLookingPhi(e.resource), [], `${f}: ${String(e.resource.resourceType)}`);
      }
    }
    assert.ok(resources > 1000, `${resources} resources checked`);
  });
});

describe('sandbox writes through the gateway', () => {
  let h: Harness;
  let productionToken: string;
  let productionProject: string;
  before(async () => {
    h = await startHarness();
    const admin = h.server.core.admin;
    const p = await admin.createProject({ name: 'Detector production', production: true });
    productionProject = p.projectId;
    await admin.recordBaa({
      projectId: p.projectId,
      counterparty: 'Example Health Plan',
      signedBy: 'Dana Roe',
      signedAt: '2024-01-15',
      services: ['fhir'],
      documentSha256: 'a'.repeat(64),
    });
    const c = await admin.createClient({
      projectId: p.projectId,
      scopes: ['system/*.cruds'],
      purposes: ['TREAT'],
    });
    const res = await fetch(`${h.server.url}/oauth/token`, {
      method: 'POST',
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope: 'system/*.cruds',
        client_id: c.clientId,
        client_secret: c.clientSecret!,
      }),
    });
    productionToken = ((await res.json()) as { access_token: string }).access_token;
  });
  after(async () => {
    await h?.close();
  });

  async function auditEvents(): Promise<Record<string, any>[]> {
    const audit = h.server.core.audit;
    const rows = await audit.read(0, await audit.size());
    return rows.map((r) => JSON.parse(r.entry.toString('utf8')) as Record<string, any>);
  }

  /** Versions stored in the sandbox project (with encryption on, an SSN is sealed: count rows, not text). */
  async function versions(): Promise<number> {
    const res = await h.server.core.resourceDb.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM resource_version WHERE project_id = $1`,
      [h.init.projectId],
    );
    return res.rows[0]!.n;
  }

  test('a labelled write with a real-looking SSN is refused (422), names path and kind, stores nothing, is audited', async () => {
    const ssn = issuableSsn();
    const stored = await versions();
    const res = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(testPatient({ identifier: [{ system: US_SSN_SYSTEM, value: ssn }] })),
    });
    const text = await res.text();
    assert.equal(res.status, 422);
    const outcome = JSON.parse(text) as { issue: any[] };
    assert.equal(outcome.issue[0].details.coding[0].code, 'SANDBOX_REAL_DATA');
    assert.deepEqual(outcome.issue[0].expression, ['Patient.identifier[0].value']);
    assert.match(outcome.issue[0].diagnostics, /^ssn: /);
    assert.ok(!text.includes(ssn) && !text.includes(ssn.replace(/-/g, '')), 'the value is never echoed');
    assert.equal(await versions(), stored, 'nothing stored');
    const refusal = (await auditEvents()).filter((e) => e.code === 'SANDBOX_REAL_DATA');
    assert.equal(refusal.length, 1);
    assert.equal(refusal[0]!.outcome, 'refused');
    assert.equal(refusal[0]!.action, 'create');
    assert.equal(refusal[0]!.projectId, h.init.projectId);
    assert.ok(!JSON.stringify(refusal).includes(ssn));
  });

  test('the same with fictional values (SSN 9xx, phone 555-01xx, example.com) is accepted', async () => {
    const res = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(
        testPatient({
          telecom: [
            { system: 'phone', value: '(617) 555-0142' },
            { system: 'email', value: 'zzyzx@example.com' },
          ],
        }),
      ),
    });
    assert.equal(res.status, 201, await res.text());
  });

  test('a transaction with one real-looking entry is refused whole; an update and a patch too', async () => {
    const before = (await auditEvents()).length;
    const stored = await versions();
    const bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: 'urn:uuid:4b8f3c4e-0000-4000-8000-000000000001',
          resource: testPatient(),
          request: { method: 'POST', url: 'Patient' },
        },
        {
          resource: {
            resourceType: 'Observation',
            meta: { security: [HTEST] },
            status: 'final',
            code: { text: 'note' },
            subject: { reference: 'urn:uuid:4b8f3c4e-0000-4000-8000-000000000001' },
            note: [{ text: `Reach the patient on (${PHONE.area}) ${PHONE.exchange}-${PHONE.line}` }],
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    };
    const tx = await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) });
    const txText = await tx.text();
    assert.equal(tx.status, 422);
    assert.match(txText, /Observation\.note\[0\]\.text/);
    assert.ok(!txText.includes(`${PHONE.exchange}-${PHONE.line}`));
    const events = (await auditEvents()).slice(before);
    assert.ok(
      events.some(
        (e) => e.action === 'transaction' && e.outcome === 'refused' && e.code === 'SANDBOX_REAL_DATA',
      ),
    );
    assert.ok(!events.some((e) => e.outcome === 'success'), 'nothing committed');
    assert.equal(await versions(), stored, 'nothing stored');

    const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    const id = ((await created.json()) as { id: string }).id;
    const put = await h.fhir(`/Patient/${id}`, {
      method: 'PUT',
      body: JSON.stringify(testPatient({ id, telecom: [{ system: 'email', value: 'z@outlook.com' }] })),
    });
    assert.equal(put.status, 422);
    const patch = await h.fhir(`/Patient/${id}`, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json-patch+json' },
      body: JSON.stringify([
        { op: 'add', path: '/telecom/-', value: { system: 'phone', value: PHONE2.dashed } },
      ]),
    });
    assert.equal(patch.status, 422);
    const current = (await (await h.fhir(`/Patient/${id}`)).json()) as { meta: { versionId: string } };
    assert.equal(current.meta.versionId, '1', 'neither the update nor the patch was stored');
    const actions = (await auditEvents()).filter((e) => e.code === 'SANDBOX_REAL_DATA').map((e) => e.action);
    assert.ok(actions.includes('update') && actions.includes('patch'));
  });

  test('a production project (with a recorded BAA) accepts the same real-looking SSN', async () => {
    const ssn = issuableSsn();
    const res = await h.fhir('/Patient', {
      token: productionToken,
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'Patient',
        identifier: [{ system: US_SSN_SYSTEM, value: ssn }],
        telecom: [{ system: 'phone', value: PHONE.dashed }],
      }),
    });
    assert.equal(res.status, 201, await res.text());
    const events = await auditEvents();
    assert.ok(
      events.some(
        (e) => e.projectId === productionProject && e.action === 'create' && e.outcome === 'success',
      ),
    );
  });
});
