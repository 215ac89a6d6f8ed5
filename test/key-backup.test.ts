import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startHarness, testPatient } from './support/harness.ts';
import { createTestStorage } from './support/storage.ts';

// The backup procedure of docs/keys.md, end to end: a data directory restored with its keys
// serves the protected data; restored without the keyring it serves none of it (and says why).
const SSN_SYSTEM = 'http://hl7.org/fhir/sid/us-ssn';

test('restore into a fresh data directory: with the keys the data reads back, without them it fails closed', async () => {
  const storage = await createTestStorage();
  const copies: string[] = [];
  try {
    const h = await startHarness({ storage });
    const res = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(testPatient({ identifier: [{ system: SSN_SYSTEM, value: '999-03-0001' }] })),
    });
    assert.equal(res.status, 201);
    const id = ((await res.json()) as { id: string }).id;
    await h.close();

    // The backup: the whole data directory (keys/ included; the embedded databases when embedded).
    const restored = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-restore-'));
    copies.push(restored);
    fs.cpSync(storage.dataDir, restored, { recursive: true });
    fs.rmSync(path.join(restored, 'server.json'), { force: true });
    const withKeys = await startHarness({
      storage: { ...storage, dataDir: restored, env: { ...storage.env, CUSTOS_DATA_DIR: restored } },
    });
    // Already initialised: the restored installation hands out a new client secret on request.
    withKeys.init.clientSecret = (await withKeys.server.core.admin.init({ newSecret: true })).clientSecret;
    const read = (await (await withKeys.fhir(`/Patient/${id}`)).json()) as any;
    assert.equal(read.identifier[0].value, '999-03-0001');
    await withKeys.close();

    // The same backup without the keyring (and its passphrase): nothing protected can be opened.
    const noKeys = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-restore-'));
    copies.push(noKeys);
    fs.cpSync(storage.dataDir, noKeys, { recursive: true });
    fs.rmSync(path.join(noKeys, 'server.json'), { force: true });
    fs.rmSync(path.join(noKeys, 'keys', 'keyring.json'));
    fs.rmSync(path.join(noKeys, 'keys', 'dev-keyring-passphrase'));
    const without = await startHarness({
      storage: { ...storage, dataDir: noKeys, env: { ...storage.env, CUSTOS_DATA_DIR: noKeys } },
    });
    without.init.clientSecret = (await without.server.core.admin.init({ newSecret: true })).clientSecret;
    const failed = await without.fhir(`/Patient/${id}`);
    const text = await failed.text();
    assert.equal(failed.status, 503);
    assert.match(text, /KEY_UNAVAILABLE/);
    assert.ok(!text.includes('999-03-0001'));
    await without.close();
  } finally {
    for (const c of copies) fs.rmSync(c, { recursive: true, force: true });
    await storage.cleanup();
  }
});
