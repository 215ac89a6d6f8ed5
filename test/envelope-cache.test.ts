import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Envelope, type SealContext } from '../src/crypto/envelope.ts';
import { openLocalKeyring } from '../src/crypto/local-keyring.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';

/**
 * The data-key cache's limits (age, uses) must never change the key a write already holds: a key
 * handed out by `prepareWrite` stays valid however the cache evicts meanwhile, so what was sealed
 * opens, and nothing is ever sealed under a zeroed key.
 */
async function envelopeWith(limits: { maxUses?: number; maxAgeMs?: number }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-envcache-'));
  const db = await PgliteDriver.open(undefined);
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
