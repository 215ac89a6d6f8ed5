import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

let h: Harness;
before(async () => {
  // Indexing off: the writes below land unindexed, as data from before the search index would.
  h = await startHarness({ env: { CUSTOS_SEARCH_INDEXING: 'off' } });
});
after(async () => {
  await h?.close();
});

async function found(query: string): Promise<number> {
  const res = await h.fhir(query);
  assert.equal(res.status, 200);
  const b = (await res.json()) as { entry: { search: { mode: string } }[] };
  return b.entry.filter((e) => e.search.mode === 'match').length;
}

test('custos reindex rebuilds stale indexes, only those, and is audited', async () => {
  for (const family of ['Reindexa', 'Reindexb', 'Reindexc']) {
    const res = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(testPatient({ name: [{ family }] })),
    });
    assert.equal(res.status, 201);
  }
  assert.equal(await found('/Patient?family=reindex'), 0, 'unindexed rows are not found');
  const first = await h.server.core.reindex({ batch: 2 });
  // Three patients and their three Provenance records, in batches of two.
  assert.equal(first.reindexed, 6);
  assert.equal(first.remaining, 0);
  assert.equal(await found('/Patient?family=reindex'), 3);
  // Resumable: a second run finds nothing stale and touches nothing.
  const again = await h.server.core.reindex({});
  assert.equal(again.reindexed, 0);
  // --all marks everything stale and rebuilds it; results are the same, not duplicated.
  const all = await h.server.core.reindex({ all: true });
  assert.equal(all.reindexed, 6);
  assert.equal(await found('/Patient?family=reindex'), 3);
  const audit = (await h.server.core.audit.read(0, 100000)).map((r) => JSON.parse(r.entry.toString('utf8')));
  assert.equal(audit.filter((e) => e.code === 'search.reindex_finished').length, 3);
});

test('production refuses indexing off', async () => {
  const storage: TestStorage = await createTestStorage();
  try {
    const child = spawn(process.execPath, [path.join(root, 'bin', 'custos.mjs'), 'reindex'], {
      env: {
        ...process.env,
        ...storage.env,
        CUSTOS_ENV: 'production',
        CUSTOS_DATABASE_URL: 'postgres://db.invalid/custos',
        CUSTOS_AUDIT_DATABASE_URL: 'postgres://audit.invalid/custos',
        CUSTOS_KEYRING_PASSPHRASE: 'synthetic-test-passphrase',
        CUSTOS_TRUSTED_PROXIES: '127.0.0.1',
        CUSTOS_PUBLIC_URL: 'https://custos.example.org',
        CUSTOS_SEARCH_INDEXING: 'off',
      },
    });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? -1)));
    assert.equal(code, 2);
    assert.match(stderr, /CUSTOS_SEARCH_INDEXING/);
  } finally {
    await storage.cleanup();
  }
});

test('custos reindex --batch rejects a bad value with a message naming it', async () => {
  const storage: TestStorage = await createTestStorage();
  try {
    const child = spawn(process.execPath, [path.join(root, 'bin', 'custos.mjs'), 'reindex', '--batch', '0'], {
      env: { ...process.env, ...storage.env },
    });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? -1)));
    assert.equal(code, 2);
    assert.match(stderr, /--batch/);
  } finally {
    await storage.cleanup();
  }
});
