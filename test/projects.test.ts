import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, type Harness } from './support/harness.ts';

// Every row belongs to a project; nothing crosses projects, whatever the route.
let h: Harness;
let otherToken: string;
let patientId: string;

before(async () => {
  h = await startHarness();
  await h.server.core.resourceDb.query(
    `INSERT INTO project (id, name, kind) VALUES ('project-two', 'Second sandbox', 'sandbox')`,
  );
  const other = await h.server.core.admin.createClient({
    projectId: 'project-two',
    scopes: ['system/*.cruds'],
    purposes: ['TREAT'],
  });
  const res = await fetch(`${h.server.url}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'client_credentials',
      scope: 'system/*.cruds',
      client_id: other.clientId,
      client_secret: other.clientSecret!,
    }),
  });
  otherToken = ((await res.json()) as { access_token: string }).access_token;
  const created = await h.fhir('/Patient', {
    method: 'POST',
    body: JSON.stringify(testPatient({ identifier: [{ system: 'urn:test:mrn', value: 'MRN-PROJ-1' }] })),
  });
  patientId = ((await created.json()) as { id: string }).id;
});
after(async () => {
  await h?.close();
});

test('another project cannot read, vread, update, patch, delete or see the history of a resource', async () => {
  const t = otherToken;
  assert.equal((await h.fhir(`/Patient/${patientId}`, { token: t })).status, 404);
  assert.equal((await h.fhir(`/Patient/${patientId}/_history/1`, { token: t })).status, 404);
  assert.equal((await h.fhir(`/Patient/${patientId}`, { token: t, method: 'DELETE' })).status, 404);
  const patch = await h.fhir(`/Patient/${patientId}`, {
    token: t,
    method: 'PATCH',
    headers: { 'content-type': 'application/json-patch+json' },
    body: JSON.stringify([{ op: 'replace', path: '/gender', value: 'male' }]),
  });
  assert.equal(patch.status, 404);
  const hist = (await (await h.fhir(`/Patient/${patientId}/_history`, { token: t })).json()) as {
    entry: unknown[];
  };
  assert.equal(hist.entry.length, 0);
  const sys = (await (await h.fhir('/_history', { token: t })).json()) as {
    entry: { resource?: { id: string } }[];
  };
  assert.ok(!sys.entry.some((e) => e.resource?.id === patientId));
  // The owner still sees version 1, unchanged.
  const own = await h.fhir(`/Patient/${patientId}`);
  assert.equal(own.headers.get('etag'), 'W/"1"');
});

test('conditions and conditional references never match another project', async () => {
  const created = await h.fhir('/Patient', {
    token: otherToken,
    method: 'POST',
    headers: { 'if-none-exist': 'identifier=urn:test:mrn|MRN-PROJ-1' },
    body: JSON.stringify(testPatient({ identifier: [{ system: 'urn:test:mrn', value: 'MRN-PROJ-1' }] })),
  });
  assert.equal(created.status, 201, 'the condition did not match the other project');
  assert.notEqual(((await created.json()) as { id: string }).id, patientId);
  const bundle = {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        resource: {
          resourceType: 'Observation',
          meta: testPatient().meta,
          status: 'final',
          code: { text: 'x' },
          subject: { reference: `Patient?_id=${patientId}` },
        },
        request: { method: 'POST', url: 'Observation' },
      },
    ],
  };
  const tx = await h.fhir('', { token: otherToken, method: 'POST', body: JSON.stringify(bundle) });
  assert.equal(tx.status, 404);
});

test('an update with a known id from another project creates nothing there', async () => {
  // PUT to an id used in project one creates an independent resource in project two (ids are per project).
  const res = await h.fhir(`/Patient/${patientId}`, {
    token: otherToken,
    method: 'PUT',
    body: JSON.stringify(testPatient({ id: patientId })),
  });
  assert.equal(res.status, 201);
  const own = await h.fhir(`/Patient/${patientId}`);
  assert.equal(own.headers.get('etag'), 'W/"1"', "project one's resource is untouched");
});

test('search never crosses projects: not by criteria, _include, _revinclude, chaining, _has or compartment', async () => {
  // A third project, empty but for what this test writes (project two holds same-id look-alikes).
  await h.server.core.resourceDb.query(
    `INSERT INTO project (id, name, kind) VALUES ('project-three', 'Third sandbox', 'sandbox')`,
  );
  const third = await h.server.core.admin.createClient({
    projectId: 'project-three',
    scopes: ['system/*.cruds'],
    purposes: ['TREAT'],
  });
  const tokenRes = await fetch(`${h.server.url}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'client_credentials',
      scope: 'system/*.cruds',
      client_id: third.clientId,
      client_secret: third.clientSecret!,
    }),
  });
  const t = ((await tokenRes.json()) as { access_token: string }).access_token;
  const ids = async (path: string) => {
    const res = await h.fhir(path, { token: t });
    assert.equal(res.status, 200, path);
    const b = (await res.json()) as { entry: { resource: { id: string; resourceType: string } }[] };
    return b.entry.filter((e) => e.resource.resourceType !== 'OperationOutcome').map((e) => e.resource.id);
  };
  assert.deepEqual(await ids('/Patient?identifier=urn:test:mrn|MRN-PROJ-1'), []);
  assert.deepEqual(await ids(`/Patient?_id=${patientId}`), []);
  assert.deepEqual(await ids(`/Patient/${patientId}/Provenance`), []);
  // Project three writes an Observation that points at project one's patient id.
  const obs = await h.fhir('/Observation', {
    token: t,
    method: 'POST',
    body: JSON.stringify({
      resourceType: 'Observation',
      meta: { security: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' }] },
      status: 'final',
      code: { coding: [{ system: 'http://loinc.org', code: '8302-2' }] },
      subject: { reference: `Patient/${patientId}` },
    }),
  });
  assert.equal(obs.status, 201);
  const included = await ids(`/Observation?subject=Patient/${patientId}&_include=Observation:subject`);
  assert.equal(
    included.length,
    1,
    'only the Observation of project three; the patient of project one is not included',
  );
  assert.deepEqual(await ids('/Observation?subject:Patient.identifier=urn:test:mrn|MRN-PROJ-1'), []);
  assert.deepEqual(await ids(`/Patient?_has:Observation:subject:code=8302-2`), []);
  assert.deepEqual(await ids(`/Patient?_id=${patientId}&_revinclude=Provenance:target`), []);
  // And project one does not see project three's Observation through its own patient.
  const mine = (await (await h.fhir(`/Observation?subject=Patient/${patientId}`)).json()) as {
    entry: unknown[];
  };
  assert.equal(mine.entry.length, 0);
});
