import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { openLocalKeyring } from '../src/crypto/local-keyring.ts';
import { KeyProviderError } from '../src/crypto/key-provider.ts';

// Several Custos processes may share one keyring file (several servers on one PostgreSQL). Each
// instance below stands for one process: they share nothing but the file.
const PASS = 'shared-keyring-test-passphrase';
const aad = Buffer.from('custos:test|p1|1');

async function twoProcesses() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-keyring-shared-'));
  const file = path.join(dir, 'keyring.json');
  const a = await openLocalKeyring(file, PASS, { create: true, scryptLog2N: 15 });
  const b = await openLocalKeyring(file, PASS, { scryptLog2N: 15 });
  return {
    file,
    a,
    b,
    close: async () => {
      await a.close();
      await b.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

test('a KEK created by one process unwraps in another that opened the keyring before', async () => {
  const t = await twoProcesses();
  try {
    const handle = await t.a.createKek('custos-p1-1');
    const dek = randomBytes(32);
    const wrapped = await t.a.wrap(handle, dek, aad);
    assert.deepEqual(await t.b.unwrap(handle, wrapped, aad), dek);
  } finally {
    await t.close();
  }
});

test('KEKs created by both processes, one after the other, all survive in the file', async () => {
  const t = await twoProcesses();
  try {
    const handles: string[] = [];
    for (let i = 0; i < 3; i++) {
      handles.push(await t.a.createKek(`custos-pa-${i}`));
      handles.push(await t.b.createKek(`custos-pb-${i}`));
    }
    // And concurrently.
    handles.push(...(await Promise.all([t.a.createKek('custos-pa-x'), t.b.createKek('custos-pb-x')])));
    const fresh = await openLocalKeyring(t.file, PASS);
    try {
      for (const h of handles) {
        const w = await fresh.wrap(h, randomBytes(32), aad);
        assert.equal(w.length, 61, h);
      }
    } finally {
      await fresh.close();
    }
    assert.equal(fs.existsSync(`${t.file}.lock`), false, 'the lock file is released');
  } finally {
    await t.close();
  }
});

test('a KEK destroyed by one process can no longer unwrap in the other (crypto-shredding holds)', async () => {
  const t = await twoProcesses();
  try {
    const handle = await t.a.createKek('custos-p1-1');
    const wrapped = await t.a.wrap(handle, randomBytes(32), aad);
    await t.b.unwrap(handle, wrapped, aad); // b has it in memory now
    await t.a.destroyKek(handle);
    await assert.rejects(
      t.b.unwrap(handle, wrapped, aad),
      (e: unknown) => e instanceof KeyProviderError && e.code === 'destroyed',
    );
    // b's next change keeps a's tombstone: the KEK does not come back.
    await t.b.createKek('custos-p1-2');
    const fresh = await openLocalKeyring(t.file, PASS);
    try {
      await assert.rejects(
        fresh.unwrap(handle, wrapped, aad),
        (e: unknown) => e instanceof KeyProviderError && e.code === 'destroyed',
      );
    } finally {
      await fresh.close();
    }
  } finally {
    await t.close();
  }
});
