import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Client } from 'fhir-kit-client';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';

// A FHIR client nobody here wrote (fhir-kit-client from npm) drives the server: CRUD, history,
// a transaction. It sends its own Accept/Content-Type headers and parses our responses.
let h: Harness;
let client: Client;

before(async () => {
  h = await startHarness();
  client = new Client({
    baseUrl: h.base,
    bearerToken: await h.token(),
    customHeaders: { 'X-Purpose-Of-Use': 'TREAT' },
  });
});
after(async () => {
  await h?.close();
});

type R = Record<string, any>;

test('fhir-kit-client: capability statement, create, read, update, vread, patch, delete', async () => {
  const cs = (await client.capabilityStatement()) as R;
  assert.equal(cs.fhirVersion, '4.0.1');
  const created = (await client.create({ resourceType: 'Patient', body: testPatient() as never })) as R;
  assert.equal(created.meta.versionId, '1');
  const read = (await client.read({ resourceType: 'Patient', id: created.id })) as R;
  assert.equal(read.name[0].family, 'Testpatient');
  const updated = (await client.update({
    resourceType: 'Patient',
    id: created.id,
    body: { ...read, gender: 'female' } as never,
  })) as R;
  assert.equal(updated.meta.versionId, '2');
  const v1 = (await client.vread({ resourceType: 'Patient', id: created.id, version: '1' })) as R;
  assert.equal(v1.gender, 'other');
  const patched = (await client.patch({
    resourceType: 'Patient',
    id: created.id,
    jsonPatch: [{ op: 'replace', path: '/gender', value: 'male' }] as never,
  })) as R;
  assert.equal(patched.gender, 'male');
  await client.delete({ resourceType: 'Patient', id: created.id });
  await assert.rejects(
    client.read({ resourceType: 'Patient', id: created.id }),
    (e: { response?: { status?: number } }) => e.response?.status === 410,
  );
});

test('fhir-kit-client: instance, type and system history', async () => {
  const created = (await client.create({ resourceType: 'Patient', body: testPatient() as never })) as R;
  await client.update({
    resourceType: 'Patient',
    id: created.id,
    body: { ...created, gender: 'unknown' } as never,
  });
  const inst = (await client.resourceHistory({ resourceType: 'Patient', id: created.id })) as R;
  assert.equal(inst.type, 'history');
  assert.equal(inst.entry.length, 2);
  const type = (await client.typeHistory({ resourceType: 'Patient' })) as R;
  assert.ok(type.entry.length >= 2);
  const sys = (await client.systemHistory()) as R;
  assert.ok(sys.entry.some((e: R) => e.resource?.resourceType === 'Provenance'));
});

test('fhir-kit-client: a transaction bundle with urn:uuid references', async () => {
  const body = {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:3f1b2c3d-0000-4000-8000-000000000001',
        resource: testPatient(),
        request: { method: 'POST', url: 'Patient' },
      },
      {
        resource: {
          resourceType: 'Encounter',
          meta: { security: [HTEST] },
          status: 'finished',
          class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
          subject: { reference: 'urn:uuid:3f1b2c3d-0000-4000-8000-000000000001' },
        },
        request: { method: 'POST', url: 'Encounter' },
      },
    ],
  };
  const res = (await client.transaction({ body: body as never })) as R;
  assert.equal(res.type, 'transaction-response');
  const patientRef = `Patient/${res.entry[0].resource.id}`;
  assert.equal(res.entry[1].resource.subject.reference, patientRef);
  const enc = (await client.read({ resourceType: 'Encounter', id: res.entry[1].resource.id })) as R;
  assert.equal(enc.subject.reference, patientRef);
});
