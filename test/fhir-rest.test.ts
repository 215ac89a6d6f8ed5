import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

async function json(res: Response): Promise<Record<string, any>> {
  return (await res.json()) as Record<string, any>;
}

describe(`FHIR REST interactions`, () => {
  test('metadata is public and truthful about search', async () => {
    const res = await fetch(`${h.base}/metadata`);
    assert.equal(res.status, 200);
    const cs = await json(res);
    assert.equal(cs.resourceType, 'CapabilityStatement');
    assert.equal(cs.fhirVersion, '4.0.1');
    const patient = cs.rest[0].resource.find((r: { type: string }) => r.type === 'Patient');
    assert.ok(patient.interaction.some((i: { code: string }) => i.code === 'vread'));
    assert.ok(patient.interaction.some((i: { code: string }) => i.code === 'search-type'));
    const names = patient.searchParam.map((p: { name: string }) => p.name);
    for (const n of ['_id', '_lastUpdated', 'name', 'family', 'birthdate', 'identifier', 'gender', '_tag'])
      assert.ok(names.includes(n), n);
    assert.ok(!names.includes('near'), 'unsupported parameters are not listed');
    const obs = cs.rest[0].resource.find((r: { type: string }) => r.type === 'Observation');
    assert.ok(obs.searchParam.some((p: { name: string }) => p.name === 'code-value-quantity'));
    assert.ok(obs.searchInclude.includes('Observation:patient'));
  });

  test('create, read, vread, update with If-Match, patch, history, versioned delete', async () => {
    const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    assert.equal(created.status, 201);
    assert.equal(created.headers.get('etag'), 'W/"1"');
    assert.match(created.headers.get('location') ?? '', /\/fhir\/R4\/Patient\/[\w-]+\/_history\/1$/);
    assert.ok(created.headers.get('last-modified'));
    const p = await json(created);
    assert.equal(p.meta.versionId, '1');

    const read = await h.fhir(`/Patient/${p.id}`);
    assert.equal(read.status, 200);
    assert.equal((await json(read)).name[0].family, 'Testpatient');

    const upd = await h.fhir(`/Patient/${p.id}`, {
      method: 'PUT',
      headers: { 'if-match': 'W/"1"' },
      body: JSON.stringify({ ...p, gender: 'female' }),
    });
    assert.equal(upd.status, 200);
    assert.equal(upd.headers.get('etag'), 'W/"2"');

    const stale = await h.fhir(`/Patient/${p.id}`, {
      method: 'PUT',
      headers: { 'if-match': 'W/"1"' },
      body: JSON.stringify({ ...p, gender: 'male' }),
    });
    assert.equal(stale.status, 412);
    assert.equal((await json(stale)).resourceType, 'OperationOutcome');

    const patched = await h.fhir(`/Patient/${p.id}`, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json-patch+json' },
      body: JSON.stringify([{ op: 'replace', path: '/birthDate', value: '1971-02-03' }]),
    });
    assert.equal(patched.status, 200);
    assert.equal((await json(patched)).birthDate, '1971-02-03');

    const v1 = await h.fhir(`/Patient/${p.id}/_history/1`);
    assert.equal(v1.status, 200);
    assert.equal((await json(v1)).gender, 'other');

    const hist = await json(await h.fhir(`/Patient/${p.id}/_history`));
    assert.equal(hist.type, 'history');
    assert.deepEqual(
      hist.entry.map((e: { resource: { meta: { versionId: string } } }) => e.resource.meta.versionId),
      ['3', '2', '1'],
    );

    const del = await h.fhir(`/Patient/${p.id}`, { method: 'DELETE' });
    assert.equal(del.status, 204);
    assert.equal((await h.fhir(`/Patient/${p.id}`)).status, 410);
    assert.equal((await h.fhir(`/Patient/${p.id}/_history/2`)).status, 200, 'old versions stay readable');
    const hist2 = await json(await h.fhir(`/Patient/${p.id}/_history`));
    assert.equal(hist2.entry[0].request.method, 'DELETE');
    assert.equal(hist2.entry.length, 4);
  });

  test('create ignores an id in the body: the server assigns it, and content and location agree', async () => {
    const res = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(testPatient({ id: 'client-chosen' })),
    });
    assert.equal(res.status, 201);
    const p = await json(res);
    assert.notEqual(p.id, 'client-chosen');
    assert.ok(res.headers.get('location')?.includes(`/Patient/${p.id}/`));
    assert.equal((await json(await h.fhir(`/Patient/${p.id}`))).id, p.id);
    assert.equal((await h.fhir('/Patient/client-chosen')).status, 404);
  });

  test('Prefer: return=minimal and return=OperationOutcome', async () => {
    const minimal = await h.fhir('/Patient', {
      method: 'POST',
      headers: { prefer: 'return=minimal' },
      body: JSON.stringify(testPatient()),
    });
    assert.equal(minimal.status, 201);
    assert.equal(await minimal.text(), '');
    const oo = await h.fhir('/Patient', {
      method: 'POST',
      headers: { prefer: 'return=OperationOutcome' },
      body: JSON.stringify(testPatient()),
    });
    assert.equal((await json(oo)).resourceType, 'OperationOutcome');
  });

  test('application/json is accepted as well as application/fhir+json', async () => {
    const res = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(testPatient()),
    });
    assert.equal(res.status, 201);
  });

  test('conditional create (If-None-Exist) and conditional update', async () => {
    const ident = { system: 'urn:test:mrn', value: 'MRN-TEST-0001' };
    const body = JSON.stringify(testPatient({ identifier: [ident] }));
    const a = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'if-none-exist': 'identifier=urn:test:mrn|MRN-TEST-0001' },
      body,
    });
    assert.equal(a.status, 201);
    const b = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'if-none-exist': 'identifier=urn:test:mrn|MRN-TEST-0001' },
      body,
    });
    assert.equal(b.status, 200);
    assert.equal((await json(a)).id, (await json(b)).id);

    const cu = await h.fhir('/Patient?identifier=urn:test:mrn|MRN-TEST-0001', {
      method: 'PUT',
      body: JSON.stringify(testPatient({ identifier: [ident], gender: 'unknown' })),
    });
    assert.equal(cu.status, 200);
    assert.equal(cu.headers.get('etag'), 'W/"2"');
    const created = await h.fhir('/Patient?identifier=urn:test:mrn|MRN-TEST-0002', {
      method: 'PUT',
      body: JSON.stringify(testPatient({ identifier: [{ system: 'urn:test:mrn', value: 'MRN-TEST-0002' }] })),
    });
    assert.equal(created.status, 201);
    // Any search parameter may be a condition; several matches are a 412 (R4 conditional create).
    const several = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'if-none-exist': 'name=Testpatient' },
      body,
    });
    assert.equal(several.status, 412);
    const unsupported = await h.fhir('/Patient', {
      method: 'POST',
      headers: { 'if-none-exist': 'no-such-parameter=1' },
      body,
    });
    assert.equal(unsupported.status, 400);
  });

  test('every write records a Provenance for its target', async () => {
    const created = await json(
      await h.fhir('/Observation', {
        method: 'POST',
        body: JSON.stringify({
          resourceType: 'Observation',
          meta: { security: [HTEST] },
          status: 'final',
          code: { text: 'test code' },
        }),
      }),
    );
    const hist = await json(await h.fhir('/Provenance/_history?_count=50'));
    const prov = hist.entry
      .map((e: { resource: Record<string, any> }) => e.resource)
      .find((r: Record<string, any>) => r.target[0].reference === `Observation/${created.id}/_history/1`);
    assert.ok(prov, 'a Provenance targets the new version');
    assert.equal(prov.activity.coding[0].code, 'CREATE');
    assert.equal(prov.agent[0].who.identifier.value, h.init.clientId);
    assert.ok(prov.recorded);
  });

  test('sandbox refuses unlabelled data with an explanation', async () => {
    const p = testPatient();
    delete p.meta;
    const res = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(p) });
    assert.equal(res.status, 422);
    const oo = await json(res);
    assert.match(oo.issue[0].details.text, /HTEST/);
  });

  test('transaction: urn:uuid references rewritten, atomic, trailing slash accepted', async () => {
    const bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: 'urn:uuid:11111111-1111-4111-8111-111111111111',
          resource: testPatient(),
          request: { method: 'POST', url: 'Patient' },
        },
        {
          fullUrl: 'urn:uuid:22222222-2222-4222-8222-222222222222',
          resource: {
            resourceType: 'Observation',
            meta: { security: [HTEST] },
            status: 'final',
            code: { text: 'test' },
            subject: { reference: 'urn:uuid:11111111-1111-4111-8111-111111111111' },
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    };
    const res = await h.fhir('/', { method: 'POST', body: JSON.stringify(bundle) });
    assert.equal(res.status, 200);
    const out = await json(res);
    assert.equal(out.type, 'transaction-response');
    const patientId = out.entry[0].resource.id;
    assert.equal(out.entry[1].resource.subject.reference, `Patient/${patientId}`);
    assert.equal(out.entry[0].response.status, '201 Created');

    // Conditional reference resolved inside the transaction.
    const cond = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          resource: {
            resourceType: 'Observation',
            meta: { security: [HTEST] },
            status: 'final',
            code: { text: 'test' },
            subject: {
              reference: 'Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-01-0001&_id=' + patientId,
            },
          },
          request: { method: 'POST', url: 'Observation' },
        },
      ],
    };
    const cres = await json(await h.fhir('', { method: 'POST', body: JSON.stringify(cond) }));
    assert.equal(cres.entry[0].resource.subject.reference, `Patient/${patientId}`);

    // Atomic: an invalid second entry means the first is not stored either.
    const before = await json(await h.fhir('/Patient/_history?_count=1000'));
    const bad = structuredClone(bundle);
    (bad.entry[1]!.resource as Record<string, unknown>).status = 'not-a-status';
    const badRes = await h.fhir('', { method: 'POST', body: JSON.stringify(bad) });
    assert.equal(badRes.status, 400);
    const afterHist = await json(await h.fhir('/Patient/_history?_count=1000'));
    assert.equal(afterHist.entry.length, before.entry.length);
  });

  test('batch: entries succeed or fail independently', async () => {
    const bundle = {
      resourceType: 'Bundle',
      type: 'batch',
      entry: [
        { resource: testPatient(), request: { method: 'POST', url: 'Patient' } },
        { request: { method: 'GET', url: 'Patient/does-not-exist' } },
      ],
    };
    const out = await json(await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) }));
    assert.equal(out.type, 'batch-response');
    assert.match(out.entry[0].response.status, /^201/);
    assert.equal(out.entry[1].response.status, '404');
    assert.equal(out.entry[1].response.outcome.resourceType, 'OperationOutcome');
  });

  test('history paging follows next links with a cursor', async () => {
    for (let i = 0; i < 5; i++)
      await h.fhir('/Device', {
        method: 'POST',
        body: JSON.stringify({ resourceType: 'Device', meta: { security: [HTEST] } }),
      });
    const seen = new Set<string>();
    let url: string | undefined = `${h.base}/Device/_history?_count=2`;
    let pages = 0;
    while (url && pages < 10) {
      const page = await json(await h.fhir(url.slice(h.base.length)));
      for (const e of page.entry) seen.add(`${e.resource.id}/${e.resource.meta.versionId}`);
      url = page.link.find((l: { relation: string }) => l.relation === 'next')?.url;
      pages++;
    }
    assert.equal(seen.size, 5);
    assert.equal(pages, 3);
  });
});

describe('access control and purpose of use', () => {
  test('no token: 401, and the refusal is audited', async () => {
    const res = await h.fhir('/Patient/x', { token: null });
    assert.equal(res.status, 401);
    assert.equal((await json(res)).resourceType, 'OperationOutcome');
  });

  test('missing purpose of use: 403 saying it is required', async () => {
    const res = await h.fhir('/Patient/x', { purpose: null });
    assert.equal(res.status, 403);
    assert.match((await json(res)).issue[0].details.text, /purpose of use is required/);
  });

  test('unknown or not-allowed purposes and break-glass are refused', async () => {
    assert.equal((await h.fhir('/Patient/x', { purpose: 'NOPE' })).status, 403);
    const bg = await h.fhir('/Patient/x', { purpose: 'ETREAT', headers: { 'x-break-glass-reason': 'test' } });
    assert.equal(bg.status, 403, 'the system client may not break glass');
  });

  test('a narrower scope is enforced', async () => {
    const token = await h.token('system/Patient.read');
    const res = await h.fhir('/Patient', { method: 'POST', token, body: JSON.stringify(testPatient()) });
    assert.equal(res.status, 403);
    const obs = await h.fhir('/Observation/x', { token });
    assert.equal(obs.status, 403);
  });
});
