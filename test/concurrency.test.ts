import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { createTestStorage, needs } from './support/storage.ts';

// Race-freedom of conditional writes. On a PostgreSQL server (many pooled connections) this relies
// on the advisory lock taken on the condition and the version check under FOR UPDATE; on embedded
// PGlite, transactions are serialized. The suite runs on whichever storage npm test uses, and the
// last test insists on the server.

async function raceConditionalCreates(
  h: Harness,
  n: number,
): Promise<{ statuses: number[]; ids: Set<string> }> {
  const token = await h.token();
  const value = `MRN-RACE-${Math.random().toString(36).slice(2)}`;
  const body = JSON.stringify(testPatient({ identifier: [{ system: 'urn:test:mrn', value }] }));
  const responses = await Promise.all(
    Array.from({ length: n }, () =>
      h.fhir('/Patient', {
        method: 'POST',
        token,
        headers: { 'if-none-exist': `identifier=urn:test:mrn|${value}` },
        body,
      }),
    ),
  );
  const statuses = responses.map((r) => r.status);
  const ids = new Set<string>();
  for (const r of responses) ids.add(((await r.json()) as { id: string }).id);
  return { statuses, ids };
}

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

test('twenty concurrent identical conditional creates give exactly one resource', async () => {
  const { statuses, ids } = await raceConditionalCreates(h, 20);
  assert.equal(statuses.filter((s) => s === 201).length, 1, `statuses: ${statuses.join(',')}`);
  assert.equal(statuses.filter((s) => s === 200).length, 19);
  assert.equal(ids.size, 1);
});

test('concurrent updates with the same If-Match: exactly one wins, the rest get 412', async () => {
  const token = await h.token();
  const p = (await (
    await h.fhir('/Patient', { method: 'POST', token, body: JSON.stringify(testPatient()) })
  ).json()) as Record<string, unknown>;
  const responses = await Promise.all(
    Array.from({ length: 10 }, (_, i) =>
      h.fhir(`/Patient/${p.id}`, {
        method: 'PUT',
        token,
        headers: { 'if-match': 'W/"1"' },
        body: JSON.stringify({ ...p, birthDate: `1980-01-${String(i + 1).padStart(2, '0')}` }),
      }),
    ),
  );
  const statuses = responses.map((r) => r.status);
  assert.equal(statuses.filter((s) => s === 200).length, 1, `statuses: ${statuses.join(',')}`);
  assert.equal(statuses.filter((s) => s === 412).length, 9);
});

test('conditional creates inside concurrent transaction bundles: one resource', async () => {
  const token = await h.token();
  const value = `MRN-TXRACE-${Math.random().toString(36).slice(2)}`;
  const bundle = JSON.stringify({
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:4b1d0c0e-0000-4000-8000-000000000001',
        resource: testPatient({ identifier: [{ system: 'urn:test:mrn', value }] }),
        request: { method: 'POST', url: 'Patient', ifNoneExist: `identifier=urn:test:mrn|${value}` },
      },
    ],
  });
  const responses = await Promise.all(
    Array.from({ length: 10 }, () => h.fhir('', { method: 'POST', token, body: bundle })),
  );
  const ids = new Set<string>();
  for (const r of responses) {
    assert.equal(r.status, 200);
    ids.add(((await r.json()) as { entry: { resource: { id: string } }[] }).entry[0]!.resource.id);
  }
  assert.equal(ids.size, 1);
});

test(
  'on the PostgreSQL server adapter: twenty concurrent conditional creates, one resource',
  { skip: needs('postgres') },
  async () => {
    const storage = await createTestStorage({ forceServer: true });
    const server = await startHarness({ storage });
    try {
      const { statuses, ids } = await raceConditionalCreates(server, 20);
      assert.equal(storage.kind, 'postgres');
      assert.equal(statuses.filter((s) => s === 201).length, 1);
      assert.equal(ids.size, 1);
    } finally {
      await server.close();
      await storage.cleanup();
    }
  },
);
