import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';

// Tampering that keeps every leaf hash right: reordered and inserted entries. Entries do not carry
// their own sequence number, so what catches these is the tree: the signed checkpoints (every entry
// is covered by one within the maximum merge delay) and the stored tiles. Plus the bad inputs of
// verify: an empty log, and checkpoints that are not this log's (a foreign or unknown signer).

async function withLog(fn: (h: Harness, dir: string) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-tamper-'));
  const h = await startHarness({
    env: { CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0', CUSTOS_AUDIT_CHECKPOINT_DIR: dir },
  });
  try {
    for (let i = 0; i < 4; i++)
      await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    await h.server.core.checkpoints.checkpoint();
    const ok = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(ok.ok, true, 'the untouched log verifies');
    await fn(h, dir);
  } finally {
    await h.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs `sql` as the owner would: with the append-only trigger off for the statements. */
async function asOwner(h: Harness, statements: [string, unknown[]?][]): Promise<void> {
  const db = h.server.core.auditDb;
  await db.query('ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_no_update');
  try {
    for (const [sql, params] of statements) await db.query(sql, params ?? []);
  } finally {
    await db.query('ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_no_update');
  }
}

test('two entries swapped (each with its own leaf hash) fail verification through the signed tree', async () => {
  await withLog(async (h) => {
    const size = await h.server.core.audit.size();
    const a = Math.floor(size / 2);
    await asOwner(h, [
      ['UPDATE audit_entry SET seq = -1 WHERE seq = $1', [a]],
      ['UPDATE audit_entry SET seq = $1 WHERE seq = $2', [a, a + 1]],
      ['UPDATE audit_entry SET seq = $1 WHERE seq = -1', [a + 1]],
    ]);
    const r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(r.firstBadSeq, undefined, 'each row is still internally consistent');
    assert.equal(r.ok, false, 'the reorder is caught');
    assert.ok(r.checkpoints?.firstBadTreeSize !== undefined || r.tiles.firstBad !== undefined);
    assert.equal(r.size, size);
  });
});

test('an entry inserted in the middle (later entries shifted) fails verification', async () => {
  await withLog(async (h) => {
    const size = await h.server.core.audit.size();
    const at = 2;
    const forged = Buffer.from(JSON.stringify({ v: 1, action: 'read', outcome: 'success', note: 'forged' }));
    await asOwner(h, [
      ['UPDATE audit_entry SET seq = -seq - 100 WHERE seq >= $1', [at]],
      ['UPDATE audit_entry SET seq = -seq - 100 + 1 WHERE seq < -99', []],
      [
        `INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase)
         SELECT $1, $2::bytea, sha256('\\x00'::bytea || $2::bytea), request_id, phase FROM audit_entry WHERE seq = 0`,
        [at, forged],
      ],
    ]);
    assert.equal(await h.server.core.audit.size(), size + 1);
    const r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(r.ok, false, 'the insertion is caught');
    assert.ok(
      r.checkpoints?.firstBadTreeSize !== undefined ||
        r.tiles.firstBad !== undefined ||
        r.firstBadSeq !== undefined,
    );
  });
});

test('a checkpoint signed by an unknown key in the checkpoint directory is reported, not trusted', async () => {
  await withLog(async (h, dir) => {
    const files = fs.readdirSync(dir).filter((f) => f.endsWith('.note'));
    assert.ok(files.length >= 1, 'the signed checkpoint was exported');
    const note = fs.readFileSync(path.join(dir, files[0]!), 'utf8');
    // Same text, signature line replaced by one from a key this log does not know.
    const body = note.slice(0, note.indexOf('\n\n') + 2);
    const foreign = `${body}— some-other-log.example/audit ${Buffer.alloc(68, 7).toString('base64')}\n`;
    const size = Number(/(\d+)/.exec(files[0]!)![1]);
    fs.writeFileSync(path.join(dir, `checkpoint-${String(size).padStart(12, '0')}.note`), foreign);
    const r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(r.ok, false);
    assert.equal(r.checkpoints?.firstBadTreeSize, size);
  });
});

test('a checkpoint of another log (same size, other root) is reported', async () => {
  await withLog(async (h, dir) => {
    // A second, independent Custos log with its own key: its checkpoint does not verify here.
    const other = await startHarness();
    try {
      await other.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
      const cp = await other.server.core.checkpoints.checkpoint();
      fs.writeFileSync(path.join(dir, `checkpoint-${String(cp.treeSize).padStart(12, '0')}.note`), cp.note);
      const r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
      assert.equal(r.ok, false);
      assert.ok(r.checkpoints?.firstBadTreeSize !== undefined);
    } finally {
      await other.close();
    }
  });
});

test('verify on an empty log passes with size 0 and the empty-tree root', async () => {
  const h = await startHarness();
  try {
    const db = h.server.core.auditDb;
    // Startup and init already wrote admin entries; a brand-new audit database has none.
    await db.query('ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_no_update');
    await db.query('DELETE FROM audit_entry');
    await db.query('ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_no_update');
    const r = await verifyAuditLog(h.server.core.audit);
    assert.equal(r.size, 0);
    assert.equal(r.rootHash, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855');
  } finally {
    await h.close();
  }
});
