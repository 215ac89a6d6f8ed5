import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, randomInt } from 'node:crypto';
import { Envelope, EPOCH_CACHE_MS, hkdfSubkey, type SealContext } from '../src/crypto/envelope.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import { openLocalKeyring } from '../src/crypto/local-keyring.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';

/**
 * The data-key cache's limits (age, uses) must never change the key a write already holds: a key
 * handed out by `prepareWrite` stays valid however the cache evicts meanwhile, so what was sealed
 * opens, and nothing is ever sealed under a zeroed key.
 */
async function envelopeWith(limits: { maxUses?: number; maxAgeMs?: number; epochCacheMs?: number }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-envcache-'));
  const raw = await PgliteDriver.open(undefined);
  // Every statement the Envelope sends outside a transaction, to show which need none.
  const queries: string[] = [];
  const db: SqlDriver = {
    kind: raw.kind,
    query: (sql, params) => {
      queries.push(sql);
      return raw.query(sql, params);
    },
    transaction: (fn) => raw.transaction(fn),
    lockedTransaction: (key, fn) => raw.lockedTransaction(key, fn),
    close: () => raw.close(),
  };
  await migrate(db, RESOURCE_MIGRATIONS, 'resource_schema_migrations');
  await db.query(`INSERT INTO project (id, name, kind) VALUES ('p1', 'Envelope cache test', 'sandbox')`);
  const provider = await openLocalKeyring(path.join(dir, 'keyring.json'), 'test-passphrase-not-a-secret', {
    create: true,
    scryptLog2N: 15,
  });
  const unwraps: string[] = [];
  const envelope = new Envelope({
    db,
    provider,
    ...limits,
    onUnwrap: async (e) => {
      unwraps.push(`${e.kind}:${e.epoch}`);
    },
  });
  return {
    envelope,
    unwraps,
    queries,
    db,
    provider,
    close: async () => {
      await provider.close();
      await db.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

const ctx = (id: string): SealContext => ({
  projectId: 'p1',
  type: 'Patient',
  id,
  version: 1,
  cls: 'identifiers',
});

test('a key held by a write survives eviction by use count: it is not zeroed, and what it sealed opens', async () => {
  const t = await envelopeWith({ maxUses: 3 });
  try {
    const { epoch, dek } = await t.envelope.prepareWrite('p1');
    const before = Buffer.from(dek);
    // Several opens push the cached data key past maxUses: it is evicted and unwrapped again.
    for (let i = 0; i < 5; i++) {
      const blob = Envelope.seal(dek, epoch, ctx(`warm${i}`), Buffer.from('999-01-0001'));
      await t.envelope.open(ctx(`warm${i}`), blob);
    }
    assert.ok(
      t.unwraps.filter((u) => u.startsWith('data')).length >= 2,
      'the cache evicted and unwrapped again',
    );
    assert.deepEqual(dek, before, 'the held key was not altered by eviction');
    assert.notDeepEqual(dek, Buffer.alloc(32), 'the held key is not all zeros');
    const sealed = Envelope.seal(dek, epoch, ctx('late'), Buffer.from('999-01-0002'));
    assert.equal((await t.envelope.open(ctx('late'), sealed)).toString(), '999-01-0002');
  } finally {
    await t.close();
  }
});

test('a key held by a write survives eviction by age and clearCache()', async () => {
  const t = await envelopeWith({ maxAgeMs: 1 });
  try {
    const { epoch, dek, blindKey } = await t.envelope.prepareWrite('p1');
    const dekBefore = Buffer.from(dek);
    const blindBefore = Buffer.from(blindKey);
    await new Promise((r) => setTimeout(r, 5));
    await t.envelope.open(ctx('a'), Envelope.seal(dek, epoch, ctx('a'), Buffer.from('x')));
    t.envelope.clearCache();
    assert.deepEqual(dek, dekBefore);
    assert.deepEqual(blindKey, blindBefore);
    const sealed = Envelope.seal(dek, epoch, ctx('b'), Buffer.from('999-01-0003'));
    assert.equal((await t.envelope.open(ctx('b'), sealed)).toString(), '999-01-0003');
    // A blind index computed with the held key still matches one computed with a fresh unwrap.
    const fresh = await t.envelope.blindKey('p1');
    assert.ok(fresh);
    assert.equal(Envelope.blind(blindKey, 24, 'identifier=a|b'), Envelope.blind(fresh, 24, 'identifier=a|b'));
    assert.ok(t.unwraps.length >= 3, 'expired keys were unwrapped again (and each unwrap reported)');
  } finally {
    await t.close();
  }
});

test('the HKDF of Envelope gives the bytes of hkdfSync on random inputs (existing ciphertexts keep opening)', () => {
  for (let i = 0; i < 500; i++) {
    const ikm = randomBytes(32);
    const info = randomBytes(randomInt(0, 300));
    const expected = Buffer.from(hkdfSync('sha256', ikm, Buffer.alloc(0), info, 32));
    assert.deepEqual(hkdfSubkey(ikm, info), expected, `input ${i}`);
    // Twice: the second derivation uses the cached extract step.
    assert.deepEqual(hkdfSubkey(ikm, info), expected, `input ${i}, cached PRK`);
  }
  // A key Buffer whose bytes change is derived from its new bytes, never from a stale cached PRK.
  const ikm = randomBytes(32);
  const info = Buffer.from('custos:seal:v1|p1|Patient|x|1|identifiers');
  hkdfSubkey(ikm, info);
  randomBytes(32).copy(ikm);
  assert.deepEqual(hkdfSubkey(ikm, info), Buffer.from(hkdfSync('sha256', ikm, Buffer.alloc(0), info, 32)));
});

test('ciphertexts made with hkdfSync and randomBytes open, and new ones open with them (format unchanged)', async () => {
  const t = await envelopeWith({});
  try {
    const { epoch, dek } = await t.envelope.prepareWrite('p1');
    const c = ctx('compat');
    const info = Buffer.from(`custos:seal:v1|${c.projectId}|${c.type}|${c.id}|${c.version}|${c.cls}`);
    // The construction as it was written before (hkdfSync subkey, randomBytes nonce).
    const subkey = Buffer.from(hkdfSync('sha256', dek, Buffer.alloc(0), info, 32));
    const nonce = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', subkey, nonce);
    cipher.setAAD(info);
    const ct = Buffer.concat([cipher.update('999-01-0042'), cipher.final(), cipher.getAuthTag()]);
    const old = `v1.${epoch}.${nonce.toString('base64url')}.${ct.toString('base64url')}`;
    assert.equal((await t.envelope.open(c, old)).toString(), '999-01-0042');
    // The synchronous path: only with the key cached; it fails closed exactly as `open` does.
    assert.equal(t.envelope.openCached(c, old)?.toString(), '999-01-0042');
    assert.throws(() => t.envelope.openCached({ ...c, id: 'moved' }, old), { code: 'SEALED_DATA_INVALID' });
    assert.throws(() => t.envelope.openCached(c, old.slice(0, -2)), { code: 'SEALED_DATA_INVALID' });
    t.envelope.clearCache();
    assert.equal(t.envelope.openCached(c, old), undefined, 'no cached key: the caller unwraps through open');
    assert.equal((await t.envelope.open(c, old)).toString(), '999-01-0042');
    // And the other way: what Envelope.seal writes opens with hkdfSync and node's decipher.
    const blob = Envelope.seal(dek, epoch, c, Buffer.from('999-01-0043'));
    const [, e, n, body] = blob.split('.') as [string, string, string, string];
    assert.equal(Number(e), epoch);
    const raw = Buffer.from(body, 'base64url');
    const d = createDecipheriv('aes-256-gcm', subkey, Buffer.from(n, 'base64url'));
    d.setAAD(info);
    d.setAuthTag(raw.subarray(raw.length - 16));
    assert.equal(
      Buffer.concat([d.update(raw.subarray(0, raw.length - 16)), d.final()]).toString(),
      '999-01-0043',
    );
  } finally {
    await t.close();
  }
});

test('every seal uses a fresh nonce, across refills of the nonce block', async () => {
  const dek = randomBytes(32);
  const nonces = new Set<string>();
  for (let i = 0; i < 2000; i++) nonces.add(Envelope.seal(dek, 1, ctx('n'), Buffer.from('x')).split('.')[2]!);
  assert.equal(nonces.size, 2000);
});

test('the current epoch is served from memory; a rotation here is seen at once, one elsewhere within the bound', async () => {
  assert.ok(EPOCH_CACHE_MS > 0 && EPOCH_CACHE_MS <= 5000, 'the documented bound is a few seconds');
  const bound = 1500;
  const t = await envelopeWith({ epochCacheMs: bound });
  try {
    assert.equal((await t.envelope.prepareWrite('p1')).epoch, 1);
    t.queries.length = 0;
    for (let i = 0; i < 20; i++) await t.envelope.prepareWrite('p1');
    assert.deepEqual(t.queries, [], 'writes in the steady state send no key query');
    // A rotation in this process: the very next write uses the new epoch.
    assert.equal(await t.envelope.rotate('p1'), 2);
    const rotatedAt = Date.now();
    const after = await t.envelope.prepareWrite('p1');
    assert.equal(after.epoch, 2);
    const sealed = Envelope.seal(after.dek, after.epoch, ctx('r'), Buffer.from('999-01-0044'));
    assert.equal((await t.envelope.open(ctx('r'), sealed)).toString(), '999-01-0044');

    // Another process on the same database (a second server, or the CLI): a second Envelope.
    const other = new Envelope({ db: t.db, provider: t.provider, onUnwrap: async () => {} });
    assert.equal(await other.rotate('p1'), 3);
    const stale = await t.envelope.prepareWrite('p1');
    if (Date.now() - rotatedAt < bound)
      assert.equal(stale.epoch, 2, 'within the bound the previous epoch may still be used');
    // ... and what it seals stays readable, here and in the other process.
    const blob = Envelope.seal(stale.dek, stale.epoch, ctx('s'), Buffer.from('999-01-0045'));
    assert.equal((await other.open(ctx('s'), blob)).toString(), '999-01-0045');
    await new Promise((r) => setTimeout(r, Math.max(0, rotatedAt + bound + 50 - Date.now())));
    assert.equal((await t.envelope.prepareWrite('p1')).epoch, 3, 'after the bound the new epoch is used');
  } finally {
    await t.close();
  }
});

test('concurrent first writes of a project share one new epoch, and concurrent lookups one query', async () => {
  const t = await envelopeWith({});
  try {
    const epochs = await Promise.all([1, 2, 3].map(() => t.envelope.currentEpoch('p1')));
    assert.deepEqual(epochs, [1, 1, 1]);
    // Another process: concurrent writes that find no cached epoch share one lookup.
    const other = new Envelope({ db: t.db, provider: t.provider, onUnwrap: async () => {} });
    t.queries.length = 0;
    const seen = await Promise.all(Array.from({ length: 16 }, () => other.currentEpoch('p1')));
    assert.deepEqual(new Set(seen), new Set([1]));
    assert.equal(t.queries.length, 1, 'one key query for sixteen concurrent writes');
    const rows = await t.db.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM data_key WHERE project_id = 'p1' AND kind = 'data'`,
    );
    assert.equal(rows.rows[0]!.n, 1);
  } finally {
    await t.close();
  }
});
