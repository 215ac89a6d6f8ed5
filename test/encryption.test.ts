import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { SYNTHEA_DIR } from './support/synthea.ts';
import { reportBundle, reportCsv } from '../src/audit/audit-report.ts';
import type { LocalKeyring } from '../src/crypto/local-keyring.ts';

// Field-level envelope encryption through the whole stack: what is stored, what each purpose of
// use sees, search through blind indexes, tampering, and a dump of every table after a Synthea load
// together with every backup and export artifact the product writes (artifacts() below).
const SSN_SYSTEM = 'http://hl7.org/fhir/sid/us-ssn';
const SSN = '999-01-4321';
const SNOMED = 'http://snomed.info/sct';
const NOTE = 'Synthetic note: patient reports zzyzx-canary symptoms';

let h: Harness;
let storage: TestStorage;
const ids: Record<string, string> = {};

async function create(resource: Record<string, unknown>): Promise<string> {
  const res = await h.fhir(`/${resource.resourceType as string}`, {
    method: 'POST',
    body: JSON.stringify({ meta: { security: [HTEST] }, ...resource }),
  });
  const body = (await res.json()) as { id: string };
  assert.equal(res.status, 201, JSON.stringify(body));
  return body.id;
}
async function read(p: string, purpose = 'TREAT'): Promise<{ status: number; body: any }> {
  const res = await h.fhir(p, { purpose });
  return { status: res.status, body: await res.json() };
}
/** Every row of every table of a database (by default the resource database), as text. */
async function dump(db = h.server.core.resourceDb): Promise<string> {
  const tables = await db.query<{ t: string }>(
    `SELECT table_name AS t FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'`,
  );
  const parts: string[] = [];
  for (const { t } of tables.rows) {
    const rows = await db.query<{ x: string }>(`SELECT t::text AS x FROM ${t} t`);
    parts.push(...rows.rows.map((r) => r.x));
  }
  return parts.join('\n');
}

/** Every file under `dir`, byte for byte (latin1 keeps ASCII secrets findable in binary files). */
function filesUnder(dir: string): string {
  if (!fs.existsSync(dir)) return '';
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => fs.readFileSync(path.join(e.parentPath, e.name)).toString('latin1'))
    .join('\n');
}

/**
 * Every backup and export artifact Custos writes today (docs/encryption.md, "Backups and exports"),
 * each as text to scan: both databases table by table (and through pg_dump on a server), the data
 * directory file by file (the documented backup of an embedded installation, with the keyring and
 * the exported checkpoints), an escrow copy of the keyring, the audit reports (access report and
 * accounting of disclosures, CSV and FHIR) of `patients`, and the server log. A bulk export
 * (`$export`) does not exist yet; when it does, its files belong here.
 */
async function artifacts(patients: readonly string[]): Promise<[string, string][]> {
  const core = h.server.core;
  const out: [string, string][] = [
    ['resource database (every table)', await dump()],
    ['audit database (every table)', await dump(core.auditDb)],
  ];
  if (storage.kind === 'postgres') {
    for (const [name, url] of [
      ['resource', storage.databaseUrl!],
      ['audit', storage.auditDatabaseUrl!],
    ] as const) {
      const r = await promisify(execFile)('pg_dump', ['--no-owner', url], { maxBuffer: 1 << 30 });
      out.push([`pg_dump of the ${name} database`, r.stdout]);
    }
  }
  await core.checkpoints.checkpoint();
  const escrow = path.join(storage.dataDir, `escrow-${randomBytes(4).toString('hex')}.json`);
  await (core.encryption!.envelope.provider as unknown as LocalKeyring).exportEscrow(escrow);
  out.push(['keyring escrow copy', fs.readFileSync(escrow, 'utf8')]);
  // Copied while the server runs; the SQL dumps above are the decompressed view of the same data
  // (PostgreSQL may store large values compressed, which a byte scan of its files would not see).
  out.push(['data directory (every file)', filesUnder(storage.dataDir)]);
  for (const patient of patients) {
    for (const kind of ['access', 'disclosures'] as const) {
      const r = await core.reports.run(kind, { patient, purpose: 'HCOMPL' });
      out.push([`${kind} report (CSV)`, reportCsv(r)]);
      out.push([`${kind} report (FHIR)`, JSON.stringify(reportBundle(r, h.base))]);
    }
  }
  out.push(['server log', h.logLines.join('\n')]);
  return out;
}

before(async () => {
  storage = await createTestStorage();
  // Signed checkpoints are also written to a directory (an artifact the product writes).
  h = await startHarness({
    storage,
    env: { CUSTOS_AUDIT_CHECKPOINT_DIR: path.join(storage.dataDir, 'checkpoints') },
  });
  ids.patient = await create(
    testPatient({
      identifier: [
        { system: 'urn:test:mrn', value: 'MRN-ENC-1' },
        { system: SSN_SYSTEM, value: SSN },
      ],
      text: {
        status: 'generated',
        div: '<div xmlns="http://www.w3.org/1999/xhtml">Zzyzx narrative canary</div>',
      },
    }),
  );
  ids.condition = await create({
    resourceType: 'Condition',
    subject: { reference: `Patient/${ids.patient}` },
    code: { coding: [{ system: SNOMED, code: '9990001', display: 'Synthetic canary disorder' }] },
    note: [{ text: NOTE }],
  });
});
after(async () => {
  await h?.close();
  await storage?.cleanup();
});

describe('field-level encryption', () => {
  test('treatment reads the whole resource back; the database holds no SSN, diagnosis or note', async () => {
    const p = await read(`/Patient/${ids.patient}`);
    assert.equal(p.status, 200);
    assert.deepEqual(
      p.body.identifier.map((i: any) => i.value),
      ['MRN-ENC-1', SSN],
    );
    assert.match(p.body.text.div, /narrative canary/);
    const c = await read(`/Condition/${ids.condition}`);
    assert.equal(c.body.code.coding[0].code, '9990001');
    assert.equal(c.body.note[0].text, NOTE);
    assert.ok(!c.body.meta.security?.some((s: any) => s.code === 'MASKED'));
    const all = await dump();
    for (const secret of [SSN, '9990001', 'Synthetic canary disorder', 'zzyzx-canary', 'narrative canary'])
      assert.ok(!all.includes(secret), `${secret} is in the resource database`);
    assert.ok(all.includes('MRN-ENC-1'), 'unprotected identifiers stay searchable in clear');
  });

  test('each purpose of use sees only its classes; the rest is masked and labelled', async () => {
    const ops = await read(`/Patient/${ids.patient}`, 'HOPERAT');
    assert.equal(ops.status, 200);
    assert.equal(ops.body.identifier[1].value, undefined);
    assert.equal(ops.body.identifier[1].extension[0].valueCode, 'masked');
    assert.ok(ops.body.meta.security.some((s: any) => s.code === 'MASKED'));
    assert.equal(ops.body.identifier[0].value, 'MRN-ENC-1');
    const cond = await read(`/Condition/${ids.condition}`, 'HOPERAT');
    assert.equal(cond.body.code.coding[0].code, '9990001', 'operations may see diagnoses');
    assert.equal(cond.body.note[0].text, undefined, 'but not notes');
    assert.equal(cond.body.note[0]._text.extension[0].valueCode, 'masked');
    const research = await read(`/Condition/${ids.condition}`, 'HRESCH');
    assert.equal(research.body.code.extension[0].valueCode, 'masked');
  });

  test('write responses are masked per purpose exactly as reads are (no class the purpose may not see)', async () => {
    const post = async (resource: Record<string, unknown>, purpose: string) => {
      const res = await h.fhir(`/${resource.resourceType as string}`, {
        method: 'POST',
        purpose,
        body: JSON.stringify({ meta: { security: [HTEST] }, ...resource }),
      });
      const text = await res.text();
      assert.equal(res.status, 201, text);
      return { text, body: JSON.parse(text) };
    };
    const condition = {
      resourceType: 'Condition',
      subject: { reference: `Patient/${ids.patient}` },
      code: { coding: [{ system: SNOMED, code: '9990002', display: 'Synthetic write-canary disorder' }] },
      note: [{ text: 'Synthetic note: write-response canary' }],
    };
    // Operations sees diagnoses, not notes; research sees neither; treatment sees both.
    for (const [purpose, codeShown, noteShown] of [
      ['HOPERAT', true, false],
      ['HRESCH', false, false],
      ['TREAT', true, true],
    ] as const) {
      const created = await post(condition, purpose);
      const again = await read(`/Condition/${created.body.id}`, purpose);
      assert.deepEqual(created.body, again.body, `${purpose}: the create response is what a read returns`);
      assert.equal(created.text.includes('9990002'), codeShown, purpose);
      assert.equal(created.text.includes('write-response canary'), noteShown, purpose);
      const labelled = created.body.meta.security.some((x: any) => x.code === 'MASKED');
      assert.equal(labelled, !(codeShown && noteShown), `${purpose}: MASKED label`);
      // Whatever the writer saw, everything was sealed: treatment reads it all back.
      const full = (await read(`/Condition/${created.body.id}`)).body;
      assert.equal(full.code.coding[0].code, '9990002');
      assert.equal(full.note[0].text, 'Synthetic note: write-response canary');
    }
    // Payment sees identifiers and diagnoses, not notes: a transaction's response entries too.
    const tx = await h.fhir('', {
      method: 'POST',
      purpose: 'HPAYMT',
      body: JSON.stringify({
        resourceType: 'Bundle',
        type: 'transaction',
        entry: [
          {
            fullUrl: 'urn:uuid:3d6f2a52-5a0e-4b8e-9d1c-0a0a0a0a0a01',
            resource: testPatient({
              identifier: [{ system: SSN_SYSTEM, value: '999-01-6001' }],
              text: { status: 'generated', div: '<div xmlns="http://www.w3.org/1999/xhtml">tx canary</div>' },
            }),
            request: { method: 'POST', url: 'Patient' },
          },
          {
            resource: {
              ...condition,
              meta: { security: [HTEST] },
              subject: { reference: 'urn:uuid:3d6f2a52-5a0e-4b8e-9d1c-0a0a0a0a0a01' },
            },
            request: { method: 'POST', url: 'Condition' },
          },
        ],
      }),
    });
    const txText = await tx.text();
    assert.equal(tx.status, 200, txText);
    assert.ok(!txText.includes('tx canary') && !txText.includes('write-response canary'));
    const [p, c] = JSON.parse(txText).entry.map((e: any) => e.resource);
    assert.equal(p.identifier[0].value, '999-01-6001');
    assert.equal(c.code.coding[0].code, '9990002');
    assert.deepEqual(p, (await read(`/Patient/${p.id}`, 'HPAYMT')).body);
    assert.deepEqual(c, (await read(`/Condition/${c.id}`, 'HPAYMT')).body);
    // Update and patch responses (treatment) are the read too.
    const put = await h.fhir(`/Condition/${c.id}`, {
      method: 'PUT',
      body: JSON.stringify({
        ...(await read(`/Condition/${c.id}`)).body,
        note: [{ text: 'Synthetic note: updated' }],
      }),
    });
    assert.equal(put.status, 200);
    assert.deepEqual(await put.json(), (await read(`/Condition/${c.id}`)).body);
    const patch = await h.fhir(`/Condition/${c.id}`, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json-patch+json' },
      body: JSON.stringify([{ op: 'replace', path: '/note/0/text', value: 'Synthetic note: patched' }]),
    });
    const patched = await patch.json();
    assert.equal(patch.status, 200, JSON.stringify(patched));
    assert.equal(patched.note[0].text, 'Synthetic note: patched');
    assert.deepEqual(patched, (await read(`/Condition/${c.id}`)).body);
  });

  test('protected elements add blind keys of protected parameters only', async () => {
    // A Patient whose only protected element is its SSN, and no `deceased`.
    const id = await create(testPatient({ identifier: [{ system: SSN_SYSTEM, value: '999-01-6002' }] }));
    const row = await h.server.core.resourceDb.query<{ search_keys: string[] }>(
      'SELECT search_keys FROM resource WHERE id = $1',
      [id],
    );
    const keys = row.rows[0]!.search_keys;
    assert.ok(
      keys.some((k) => k.startsWith('identifier=#b:')),
      'the SSN is indexed blind',
    );
    assert.ok(!keys.some((k) => k.includes('999-01-6002')), 'and never in clear');
    // Evaluated over the projection of the protected elements, other parameters say things about
    // the projection, not the resource (Patient `deceased` is `false` there): before, every encrypted
    // Patient carried their blind forms, which no search can ever ask for.
    const protectedCodes = new Set(['identifier']);
    const blind = keys.filter((k) => k.includes('=#b:'));
    assert.ok(blind.length > 0);
    for (const k of blind)
      assert.ok(protectedCodes.has(k.split(/[:=]/)[0]!), `${k} is a blind key of an unprotected parameter`);
    assert.ok(!blind.some((k) => k.startsWith('deceased')));
  });

  test('exact search through blind indexes; plaintext-needing searches are refused', async () => {
    const found = (await read(`/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|${SSN}`)}`)).body;
    assert.deepEqual(
      found.entry.map((e: any) => e.resource.id),
      [ids.patient],
    );
    const bare = (await read(`/Patient?identifier=${SSN}`)).body;
    assert.equal(bare.entry.length, 1);
    const none = (await read(`/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|999-01-0000`)}`)).body;
    assert.equal(none.entry.length, 0);
    const cond = (await read(`/Condition?code=${encodeURIComponent(`${SNOMED}|9990001`)}`)).body;
    assert.deepEqual(
      cond.entry.map((e: any) => e.resource.id),
      [ids.condition],
    );
    const text = await h.fhir(`/Condition?code:text=synthetic`);
    assert.equal(text.status, 400);
    assert.match(await text.text(), /SEARCH_PROTECTED/);
    const research = await h.fhir(`/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|${SSN}`)}`, {
      purpose: 'HRESCH',
    });
    assert.equal(research.status, 400, 'a purpose that may not see SSNs may not search by them');
    // Conditional create on the SSN matches through the blind index.
    const again = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'if-none-exist': `identifier=${SSN_SYSTEM}|${SSN}` },
      body: JSON.stringify(testPatient({ identifier: [{ system: SSN_SYSTEM, value: SSN }] })),
    });
    assert.equal(again.status, 200);
    assert.equal(((await again.json()) as { id: string }).id, ids.patient);
  });

  test('blind-index collisions never reach the caller: matches are re-checked after decryption', async () => {
    const other = await create(testPatient({ identifier: [{ system: SSN_SYSTEM, value: '999-01-5555' }] }));
    // Simulate a truncation collision: the other patient's index now also carries this SSN's blind key.
    await h.server.core.resourceDb.query(
      `UPDATE resource SET search_keys = search_keys || (SELECT search_keys FROM resource WHERE id = $1) WHERE id = $2`,
      [ids.patient, other],
    );
    const found = (await read(`/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|${SSN}`)}`)).body;
    assert.deepEqual(
      found.entry.map((e: any) => e.resource.id),
      [ids.patient],
    );
  });

  test('the blind-index size follows the CipherSweet planning rule', async () => {
    const { planBlindBits } = await import('../src/crypto/envelope.ts');
    assert.equal(planBlindBits(1_000_000), 18);
    assert.equal(planBlindBits(100), 16);
    assert.equal(planBlindBits(1e12), 32);
    for (const rows of [1e6, 1e7, 1e8]) {
      const c = rows / 2 ** planBlindBits(rows);
      assert.ok(c >= 2 && c < Math.sqrt(rows), `${rows}: ${c} coincidences per value`);
    }
  });

  test('a caller who cannot see a class cannot overwrite it', async () => {
    const res = await h.fhir(`/Patient/${ids.patient}`, {
      method: 'PUT',
      purpose: 'HOPERAT',
      body: JSON.stringify(testPatient({ id: ids.patient })),
    });
    assert.equal(res.status, 403);
    const p = await read(`/Patient/${ids.patient}`);
    assert.equal(p.body.identifier[1].value, SSN, 'the SSN is intact');
  });

  test('a ciphertext moved to another record or altered fails closed, audited', async () => {
    const other = await create(testPatient({ identifier: [{ system: SSN_SYSTEM, value: '999-01-7777' }] }));
    const db = h.server.core.resourceDb;
    // Move patient one's sealed identifiers onto the other patient.
    await db.query(`UPDATE resource SET sealed = (SELECT sealed FROM resource WHERE id = $1) WHERE id = $2`, [
      ids.patient,
      other,
    ]);
    const moved = await h.fhir(`/Patient/${other}`);
    const text = await moved.text();
    assert.equal(moved.status, 500);
    assert.match(text, /SEALED_DATA_INVALID/);
    assert.ok(!text.includes(SSN) && !text.includes('999-01-7777'));
    const audit = (await h.server.core.audit.read(0, 100000)).map((r) =>
      JSON.parse(r.entry.toString('utf8')),
    );
    assert.ok(
      audit.some((e) => e.action === 'read' && e.outcome === 'failed' && e.code === 'SEALED_DATA_INVALID'),
    );
    // Flip one character of a ciphertext.
    await db.query(
      `UPDATE resource SET sealed = jsonb_build_object('identifiers', regexp_replace(sealed->>'identifiers', '.$', 'A')) WHERE id = $1`,
      [ids.patient],
    );
    const flipped = await h.fhir(`/Patient/${ids.patient}`);
    // Either the last character already was 'A' (then nothing changed) or the tag check fails.
    assert.ok(flipped.status === 500 || flipped.status === 200);
  });

  test('every key unwrap is in the audit log (key access log)', async () => {
    const audit = (await h.server.core.audit.read(0, 100000)).map((r) =>
      JSON.parse(r.entry.toString('utf8')),
    );
    const unwraps = audit.filter((e) => e.action === 'key');
    assert.ok(unwraps.some((e) => e.code === 'key.unwrap_data'));
    assert.ok(unwraps.some((e) => e.code === 'key.unwrap_blind'));
  });
});

const syntheaDir = SYNTHEA_DIR;
const SYNTHEA = [
  'Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json',
  'Ned_Hintz_e4b9259d-0f54-48d1-a35d-b526729a4dfe.json',
];

test(
  'after a Synthea load, no dump, backup or export Custos writes holds their SSNs, diagnosis codes, notes or narratives',
  {
    skip: SYNTHEA.every((f) => fs.existsSync(path.join(syntheaDir, f)))
      ? false
      : 'shared/data/synthea-r4 absent',
  },
  async () => {
    // `quoted`: secrets looked for as they would appear in JSON text (codes are short digit strings
    // that could occur by chance elsewhere); `bare`: distinctive enough to look for anywhere, in
    // binary files too.
    const quoted = new Set<string>();
    const bare = new Set<string>();
    const ssns: string[] = [];
    for (const f of SYNTHEA) {
      const bundle = JSON.parse(fs.readFileSync(path.join(syntheaDir, f), 'utf8')) as any;
      for (const e of bundle.entry) {
        const r = e.resource;
        r.meta = { ...(r.meta ?? {}), security: [...(r.meta?.security ?? []), HTEST] };
        if (r.resourceType === 'Patient') {
          for (const i of r.identifier ?? [])
            if (i.system === SSN_SYSTEM) {
              bare.add(i.value);
              ssns.push(i.value);
            }
          // The narrative's one patient-specific part (Synthea's seed).
          const seed = /Person seed: -?\d+/.exec(r.text?.div ?? '')?.[0];
          if (seed) bare.add(seed);
        }
        if (r.resourceType === 'Condition') {
          for (const c of r.code.coding) if (c.system === SNOMED) quoted.add(`|${c.code}`).add(`"${c.code}"`);
          // Synthea writes no notes: each Condition gets a synthetic one.
          const note = `Synthetic note zzyzx-${randomBytes(8).toString('hex')}: no real data`;
          r.note = [{ text: note }];
          bare.add(note);
        }
      }
      const res = await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) });
      assert.equal(res.status, 200);
    }
    assert.ok(quoted.size > 4 && ssns.length === SYNTHEA.length);
    // Use the data as an application would, so the audit log and its reports have something to say:
    // a search by SSN (its query is in the audit log, sealed), and a read for research (a disclosure).
    const patients: string[] = [];
    for (const ssn of ssns) {
      const found = (await read(`/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|${ssn}`)}`)).body;
      assert.equal(found.entry.length, 1);
      patients.push(found.entry[0].resource.id);
      assert.equal((await read(`/Patient/${found.entry[0].resource.id}`, 'HRESCH')).status, 200);
    }
    bare.add(SSN);
    const scanned = await artifacts(patients);
    assert.ok(scanned.length >= 7, scanned.map(([name]) => name).join(', '));
    const artifact = (name: string) => scanned.filter(([n]) => n === name).map(([, text]) => text);
    // The scans see the data: unprotected values are there in clear, and the reports have rows.
    const mrn = 'ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423'; // Buster Hoeger's Synthea MRN (not protected)
    assert.ok(artifact('resource database (every table)')[0]!.includes(mrn));
    if (storage.kind === 'postgres')
      assert.ok(artifact('pg_dump of the resource database')[0]!.includes(mrn));
    for (const csv of artifact('disclosures report (CSV)'))
      assert.ok(csv.trim().split('\n').length >= 2, 'the research read is accounted for');
    assert.ok(fs.readdirSync(path.join(storage.dataDir, 'checkpoints')).length > 0);
    for (const [name, text] of scanned) {
      for (const s of bare) assert.ok(!text.includes(s), `${s} is in the ${name}`);
      if (name === 'data directory (every file)') continue;
      for (const s of quoted) assert.ok(!text.includes(s), `${s} is in the ${name}`);
    }
  },
);
