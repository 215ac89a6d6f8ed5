import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { runCustos } from './support/custos-cli.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { splitSql } from '../src/store/migrations.ts';
import { silentLogger } from '../src/log/logger.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { AuditLog } from '../src/audit/audit-log.ts';
import { Checkpoints } from '../src/audit/checkpoints.ts';
import { verifyAuditLog, type AuditVerifyReport } from '../src/audit/audit-verify.ts';
import { leafHash, type AuditEvent } from '../src/audit/audit-event.ts';
import {
  consistencyProof,
  inclusionProof,
  memoryLeafSource,
  treeHead,
  verifyConsistency,
  verifyInclusion,
} from '../src/audit/merkle-proof.ts';
import { TILE_MIGRATION_SQL, TileBuilder, Tiles, tilePath, type Tile } from '../src/audit/tiles.ts';
import { parseCheckpoint, verifyNote } from '../src/audit/signed-note.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';

// Tiles (C2SP tlog-tiles) in the audit database: stored tiles equal the recomputed tree, proofs from
// tiles equal proofs from the leaf hashes and take O(log n) reads, verify catches a tampered tile,
// and verify's parallel path reports exactly what the serial path reports.

const VECTORS = path.resolve(fileURLToPath(import.meta.url), '../../../shared/data/tlog-vectors');
const REFERENCE = path.join(VECTORS, 'rfc6962-reference-tree.json');

/** A driver that counts the queries sent through it. */
function counting(db: SqlDriver): SqlDriver & { queries: number } {
  const c: SqlDriver & { queries: number } = {
    kind: db.kind,
    queries: 0,
    query: (sql, params) => {
      c.queries++;
      return db.query(sql, params);
    },
    transaction: (fn) => db.transaction(fn),
    lockedTransaction: (key, fn) => db.lockedTransaction(key, fn),
    close: () => db.close(),
  };
  if (db.copyOut) c.copyOut = (q) => db.copyOut!(q);
  return c;
}

async function applyTileSchema(db: SqlDriver): Promise<void> {
  for (const stmt of splitSql(TILE_MIGRATION_SQL)) await db.query(stmt);
}

/** A fresh audit database (the configured storage kind) with its schema and the tile table. */
async function openAuditDb(): Promise<{ db: SqlDriver; storage: TestStorage; close(): Promise<void> }> {
  const storage = await createTestStorage();
  const raw = storage.auditDatabaseUrl
    ? await PgDriver.open(storage.auditDatabaseUrl)
    : await PgliteDriver.open(path.join(storage.dataDir, 'audit'));
  await prepareAuditSchema(raw, { production: false, log: silentLogger });
  await applyTileSchema(raw);
  return {
    db: raw,
    storage,
    async close() {
      await raw.close();
      await storage.cleanup();
    },
  };
}

function event(i: number, phase: AuditEvent['phase'] = 'access', requestId = `req-${i}`): AuditEvent {
  return {
    v: 1,
    id: randomUUID(),
    time: new Date(1_780_000_000_000 + i).toISOString(),
    phase,
    action: phase === 'access' ? 'read' : 'create',
    outcome: phase === 'attempt' ? 'pending' : 'success',
    requestId,
    actor: { clientId: 'tiles-test' },
    resource: { type: 'Patient', id: `p-${i % 97}` },
    source: {},
  };
}

/** Appends n events: every 50th a write attempt, with its outcome 3 entries later (one left dangling). */
async function fill(log: AuditLog, n: number): Promise<void> {
  const events: AuditEvent[] = [];
  for (let i = 0; events.length < n; i++) {
    if (i % 50 === 0) events.push(event(i, 'attempt', `write-${i}`));
    else if (i % 50 === 3 && i !== 253) events.push(event(i, 'outcome', `write-${i - 3}`));
    else events.push(event(i));
  }
  await Promise.all(events.slice(0, n).map((e) => log.append(e)));
}

function randomLeaves(n: number): Buffer[] {
  const all = randomBytes(n * 32);
  return Array.from({ length: n }, (_, i) => all.subarray(i * 32, (i + 1) * 32));
}

/** Every full tile of a leaf list, by the builder (independent of the database). */
function recomputedTiles(leaves: readonly Buffer[]): Tile[] {
  const tiles: Tile[] = [];
  const b = new TileBuilder((t) => tiles.push(t));
  for (const l of leaves) b.addLeaf(l);
  return tiles.sort((x, y) => x.level - y.level || x.index - y.index);
}

async function storedTiles(tiles: Tiles): Promise<Tile[]> {
  const out: Tile[] = [];
  const counts = await tiles.storedCounts();
  for (let level = 0; level < counts.length; level++) for await (const t of tiles.stored(level)) out.push(t);
  return out;
}

const randInt = (n: number) => Math.floor(Math.random() * n);

/**
 * RFC 9162 §2.1 written out recursively (MTH, PATH, SUBPROOF), with the perfect subtrees precomputed
 * level by level: an oracle that shares no code with merkle-proof.ts or tiles.ts.
 */
function rfcOracle(leaves: readonly Buffer[]) {
  const node = (l: Buffer, r: Buffer) =>
    createHash('sha256')
      .update(Buffer.from([1]))
      .update(l)
      .update(r)
      .digest();
  const levels: Buffer[][] = [leaves.slice()];
  while (levels[levels.length - 1]!.length > 1) {
    const below = levels[levels.length - 1]!;
    levels.push(
      Array.from({ length: Math.floor(below.length / 2) }, (_, i) => node(below[2 * i]!, below[2 * i + 1]!)),
    );
  }
  const split = (n: number) => {
    let k = 1;
    while (k * 2 < n) k *= 2;
    return k;
  };
  const mth = (a: number, b: number): Buffer => {
    const n = b - a;
    if (n === 0) return createHash('sha256').digest();
    const h = Math.log2(n);
    if (Number.isInteger(h) && a % n === 0) return levels[h]![a / n]!;
    const k = split(n);
    return node(mth(a, a + k), mth(a + k, b));
  };
  const path = (m: number, a: number, b: number): Buffer[] => {
    if (b - a <= 1) return [];
    const k = split(b - a);
    return m < k ? [...path(m, a, a + k), mth(a + k, b)] : [...path(m - k, a + k, b), mth(a, a + k)];
  };
  const subproof = (m: number, a: number, b: number, start: boolean): Buffer[] => {
    if (m === b - a) return start ? [] : [mth(a, b)];
    const k = split(b - a);
    return m <= k
      ? [...subproof(m, a, a + k, start), mth(a + k, b)]
      : [...subproof(m - k, a + k, b, false), mth(a, a + k)];
  };
  return { mth, path, proof: (m: number, n: number) => subproof(m, 0, n, true) };
}

test('tile paths follow C2SP tlog-tiles', () => {
  assert.equal(tilePath(0, 1234067), 'tile/0/x001/x234/067');
  assert.equal(tilePath(1, 5), 'tile/1/005');
  assert.equal(tilePath(2, 1000, 17), 'tile/2/x001/000.p/17');
  assert.equal(tilePath(0, 0, 1), 'tile/0/000.p/1');
});

describe('tiles over a leaf list', () => {
  // 70,123 leaves: 273 full level-0 tiles and a partial one of 235, 1 full level-1 tile and a
  // partial one of 17 (not a multiple of 256 at either level).
  const N = 65_536 + 17 * 256 + 235;
  const leaves = randomLeaves(N);
  const reads = { leafCalls: 0 };
  const memory = memoryLeafSource(leaves);
  const leafSource = {
    size: memory.size,
    leafHashes: (a: number, b: number) => {
      reads.leafCalls++;
      return memory.leafHashes(a, b);
    },
  };
  let db: SqlDriver & { queries: number };
  let close: () => Promise<void>;
  let tiles: Tiles;
  before(async () => {
    const opened = await openAuditDb();
    db = counting(opened.db);
    close = opened.close;
    tiles = new Tiles(db, leafSource);
  });
  after(async () => {
    await close?.();
  });

  test('tiles are written as the log grows, never twice, and equal the recomputed tree', async () => {
    assert.equal(await tiles.extend(1000), 3);
    assert.deepEqual(await tiles.storedCounts(), [3]);
    assert.equal(await tiles.extend(N), 273 - 3 + 1);
    assert.deepEqual(await tiles.storedCounts(), [273, 1]);
    assert.equal(await tiles.extend(N), 0, 'full tiles are never rewritten');
    const stored = await storedTiles(tiles);
    const expected = recomputedTiles(leaves);
    assert.equal(stored.length, expected.length);
    for (let i = 0; i < stored.length; i++) {
      assert.equal(stored[i]!.level, expected[i]!.level);
      assert.equal(stored[i]!.index, expected[i]!.index);
      assert.ok(
        stored[i]!.hashes.equals(expected[i]!.hashes),
        `tile ${stored[i]!.level}/${stored[i]!.index}`,
      );
      assert.ok(stored[i]!.root.equals(expected[i]!.root));
    }
  });

  test('heads and proofs from tiles equal those from the leaf hashes, at any size', async () => {
    await tiles.extend(N);
    const src = tiles.source();
    const oracle = rfcOracle(leaves);
    const edges = [1, 2, 3, 255, 256, 257, 511, 512, 513, 65_535, 65_536, 65_537, 65_536 + 256, N - 1, N];
    const sizes = [...edges, ...Array.from({ length: 25 }, () => 1 + randInt(N))];
    for (const n of sizes) {
      const root = await treeHead(src, n);
      assert.ok(root.equals(oracle.mth(0, n)), `head ${n}`);
      for (const i of [0, n - 1, Math.floor(n / 2), randInt(n), randInt(n)]) {
        const p = await inclusionProof(src, i, n);
        assert.deepEqual(p, oracle.path(i, 0, n), `inclusion ${i}/${n}`);
        assert.ok(verifyInclusion(i, n, leaves[i]!, p, root));
      }
      for (const m of [1, n, Math.max(1, n - 1), 1 + randInt(n), 256, 65_536].filter((m) => m <= n)) {
        const p = await consistencyProof(src, m, n);
        assert.deepEqual(p, oracle.proof(m, n), `consistency ${m}->${n}`);
        assert.ok(verifyConsistency(m, n, p, oracle.mth(0, m), root));
      }
    }
    // And the leaf-streaming generator (no tiles) agrees, for a few.
    for (const n of [257, 65_537, N]) {
      const i = randInt(n);
      assert.deepEqual(await inclusionProof(src, i, n), await inclusionProof(memory, i, n));
      assert.ok((await treeHead(src, n)).equals(await treeHead(memory, n)));
    }
  });

  test('a proof costs O(log n) reads: a few queries per 256-fold level, whatever the size', async () => {
    await tiles.extend(N);
    const src = tiles.source();
    const cost = async (fn: () => Promise<unknown>) => {
      const q0 = db.queries;
      const l0 = reads.leafCalls;
      await fn();
      return db.queries - q0 + (reads.leafCalls - l0);
    };
    // Levels of tiles a tree of n leaves has: ceil(log256 n). Each level costs at most one read
    // (its partial tile), plus one query for every stored tile the proof touches.
    const levels = (n: number) => Math.ceil(Math.log2(n) / 8);
    for (const n of [300, 4_000, 65_536, 65_537, N]) {
      for (let k = 0; k < 10; k++) {
        const i = randInt(n);
        const m = 1 + randInt(n);
        const inc = await cost(() => inclusionProof(src, i, n));
        const con = await cost(() => consistencyProof(src, m, n));
        const head = await cost(() => treeHead(src, n));
        assert.ok(inc <= levels(n) + 1, `inclusion ${i}/${n}: ${inc} reads`);
        assert.ok(con <= levels(n) + 1, `consistency ${m}->${n}: ${con} reads`);
        assert.ok(head <= levels(n) + 1, `head ${n}: ${head} reads`);
      }
    }
    // Without tiles the same proof reads every leaf hash (in pages).
    const bare = await cost(() => inclusionProof(leafSource, 5, N));
    assert.ok(bare >= Math.floor(N / 4096), `leaf streaming: ${bare} reads`);
  });

  test('tiles that lag behind the log still give the right proofs (computed from what is there)', async () => {
    const other = await openAuditDb();
    try {
      const lagging = new Tiles(other.db, leafSource);
      await lagging.extend(2_000);
      const src = lagging.source();
      for (let k = 0; k < 10; k++) {
        const n = 60_000 + randInt(N - 60_000);
        const i = randInt(n);
        assert.deepEqual(await inclusionProof(src, i, n), await inclusionProof(memory, i, n));
      }
    } finally {
      await other.close();
    }
  });

  test(
    'the RFC 6962 reference tree: heads and proofs from tiles match the published roots',
    { skip: fs.existsSync(REFERENCE) ? false : 'shared/data/tlog-vectors absent' },
    async () => {
      const ref = JSON.parse(fs.readFileSync(REFERENCE, 'utf8')) as {
        leafInputsHex: string[];
        rootHashesBySize: string[];
      };
      const refLeaves = ref.leafInputsHex.map((h) => leafHash(Buffer.from(h, 'hex')));
      const other = await openAuditDb();
      try {
        const t = new Tiles(other.db, memoryLeafSource(refLeaves));
        await t.extend();
        const src = t.source();
        const root = (n: number) => Buffer.from(ref.rootHashesBySize[n]!, 'hex');
        for (let n = 1; n <= 8; n++) {
          assert.equal((await treeHead(src, n)).toString('hex'), ref.rootHashesBySize[n]);
          for (let i = 0; i < n; i++)
            assert.ok(verifyInclusion(i, n, refLeaves[i]!, await inclusionProof(src, i, n), root(n)));
          for (let m = 1; m <= n; m++)
            assert.ok(verifyConsistency(m, n, await consistencyProof(src, m, n), root(m), root(n)));
        }
      } finally {
        await other.close();
      }
    },
  );
});

/** verify, serial and on two worker threads with small batches: the reports must be identical. */
async function verifyBoth(log: AuditLog, cps?: Checkpoints): Promise<AuditVerifyReport> {
  const serial = await verifyAuditLog(log, cps, { workers: 0 });
  const parallel = await verifyAuditLog(log, cps, { workers: 2, batchRows: 512 });
  assert.deepEqual(parallel, serial, 'parallel and serial verify agree');
  return serial;
}

async function tamper(
  db: SqlDriver,
  table: 'audit_entry' | 'audit_tile',
  sql: string,
  params: unknown[] = [],
) {
  const trigger = table === 'audit_entry' ? 'audit_entry_no_update' : 'audit_tile_no_update';
  await db.query(`ALTER TABLE ${table} DISABLE TRIGGER ${trigger}`);
  try {
    await db.query(sql, params);
  } finally {
    await db.query(`ALTER TABLE ${table} ENABLE TRIGGER ${trigger}`);
  }
}

describe('tiles of the audit log', () => {
  const N = 65_536 + 5 * 256 + 77;
  let opened: Awaited<ReturnType<typeof openAuditDb>>;
  let db: SqlDriver & { queries: number };
  let log: AuditLog;
  let cps: Checkpoints;
  before(async () => {
    opened = await openAuditDb();
    db = counting(opened.db);
    log = new AuditLog(db);
    cps = new Checkpoints({
      audit: log,
      keyFile: path.join(opened.storage.dataDir, 'keys', 'audit-checkpoint.skey'),
      origin: 'tiles.test/custos/audit',
    });
    await fill(log, 30_000);
    await cps.checkpoint();
    await fill(log, N - 30_000);
  });
  after(async () => {
    await opened?.close();
  });

  test('signing a checkpoint stores the tiles; verify recomputes and checks every one', async () => {
    const cp = await cps.checkpoint();
    assert.equal(cp.treeSize, N);
    assert.deepEqual(await cps.tiles.storedCounts(), [Math.floor(N / 256), 1]);
    const r = await verifyBoth(log, cps);
    assert.equal(r.ok, true);
    assert.equal(r.size, N);
    assert.equal(r.tiles.checked, Math.floor(N / 256) + 1);
    assert.equal(r.checkpoints?.checked, 2);
    assert.deepEqual(r.attemptsWithoutOutcome, ['write-250']);
    assert.equal(r.rootHash, cp.rootHash);
  });

  test('inclusion and consistency proofs verify, with a handful of queries each', async () => {
    const cp = await cps.checkpoint();
    const root = Buffer.from(cp.rootHash, 'hex');
    for (const seq of [0, 255, 256, 65_535, 65_536, N - 1, randInt(N)]) {
      const q0 = db.queries;
      const p = (await cps.prove(seq))!;
      assert.ok(db.queries - q0 <= 12, `prove ${seq}: ${db.queries - q0} queries`);
      const ok = verifyInclusion(
        seq,
        p.treeSize,
        Buffer.from(p.leafHash, 'hex'),
        p.proof.map((h) => Buffer.from(h, 'hex')),
        root,
      );
      assert.ok(ok, `seq ${seq}`);
    }
    const c = await cps.consistency(30_000, N);
    assert.equal(c.from.treeSize, 30_000);
    assert.ok(c.from.checkpoint && c.to.checkpoint, 'both sizes were signed');
    const r1 = parseCheckpoint(verifyNote(c.from.checkpoint, [c.verifierKey]).text).rootHash;
    const r2 = parseCheckpoint(verifyNote(c.to.checkpoint, [c.verifierKey]).text).rootHash;
    assert.equal(r1.toString('hex'), c.from.rootHash);
    assert.equal(r2.toString('hex'), c.to.rootHash);
    assert.ok(
      verifyConsistency(
        30_000,
        N,
        c.proof.map((h) => Buffer.from(h, 'hex')),
        r1,
        r2,
      ),
    );
    const unsigned = await cps.consistency(12_345);
    assert.equal(unsigned.from.checkpoint, undefined);
    assert.equal(unsigned.to.treeSize, N, 'to defaults to the current log');
    assert.ok(
      verifyConsistency(
        12_345,
        N,
        unsigned.proof.map((h) => Buffer.from(h, 'hex')),
        Buffer.from(unsigned.from.rootHash, 'hex'),
        r2,
      ),
    );
    for (const [from, to] of [
      ['x', N],
      [5, 3],
      [1, N + 1],
      [0, 5],
      [1.5, 5],
      [-1, 5],
      [1, '9'],
    ] as [unknown, unknown][]) {
      await assert.rejects(
        cps.consistency(from, to),
        (e: { code?: string }) => e.code === 'BAD_REQUEST',
        `${String(from)} -> ${String(to)}`,
      );
    }
  });

  test('a tampered tile is reported by verify, and no proof is handed out through it', async () => {
    // Entry 125 of the level-1 tile (bytes 4000..4031) changes.
    await tamper(
      db,
      'audit_tile',
      `UPDATE audit_tile SET hashes = overlay(hashes placing sha256(hashes) from 4001) WHERE level = 1 AND idx = 0`,
    );
    const r = await verifyBoth(log, cps);
    assert.equal(r.ok, false);
    assert.equal(r.firstBadSeq, undefined, 'the entries are intact');
    assert.deepEqual(r.tiles.firstBad, { level: 1, index: 0 });
    // Leaf 0's path takes the subtree of level-1 entries 64..127 as a sibling.
    await assert.rejects(cps.prove(0), /does not verify/);
  });
});

describe('verify on tampered logs: the first bad sequence number, serial and parallel alike', () => {
  let opened: Awaited<ReturnType<typeof openAuditDb>>;
  let log: AuditLog;
  let cps: Checkpoints;
  before(async () => {
    opened = await openAuditDb();
    log = new AuditLog(opened.db);
    cps = new Checkpoints({
      audit: log,
      keyFile: path.join(opened.storage.dataDir, 'keys', 'audit-checkpoint.skey'),
      origin: 'tiles.test/custos/audit',
    });
    await fill(log, 3_000);
    await cps.checkpoint();
  });
  after(async () => {
    await opened?.close();
  });

  test('intact, then a stray tile, an undecodable entry, a changed entry, a missing entry', async () => {
    const db = opened.db;
    assert.equal((await verifyBoth(log, cps)).ok, true);

    // A tile for entries the log does not have.
    await db.query('INSERT INTO audit_tile (level, idx, hashes, root) VALUES (0, 500, $1, $2)', [
      randomBytes(8192),
      randomBytes(32),
    ]);
    let r = await verifyBoth(log, cps);
    assert.deepEqual([r.ok, r.firstBadSeq, r.tiles.firstBad], [false, undefined, { level: 0, index: 500 }]);

    // Not JSON, with a matching leaf hash.
    await tamper(
      db,
      'audit_entry',
      `UPDATE audit_entry SET entry = '\\x7b6e6f'::bytea, leaf_hash = sha256('\\x007b6e6f'::bytea) WHERE seq = 2900`,
    );
    r = await verifyBoth(log, cps);
    assert.deepEqual([r.firstBadSeq, r.problem, r.ok], [2900, 'undecodable_entry', false]);

    await tamper(
      db,
      'audit_entry',
      `UPDATE audit_entry SET entry = convert_to(replace(convert_from(entry, 'UTF8'), 'tiles-test', 'tiles-TEST'), 'UTF8') WHERE seq = 1500`,
    );
    r = await verifyBoth(log, cps);
    assert.deepEqual([r.firstBadSeq, r.problem], [1500, 'leaf_hash_mismatch']);

    await tamper(db, 'audit_entry', 'DELETE FROM audit_entry WHERE seq = 700');
    r = await verifyBoth(log, cps);
    assert.deepEqual([r.firstBadSeq, r.problem], [700, 'sequence_gap']);
    assert.notEqual(r.checkpoints?.firstBadTreeSize, undefined, 'the signed head no longer matches');

    await tamper(db, 'audit_entry', `UPDATE audit_entry SET leaf_hash = '\\x00'::bytea WHERE seq = 10`);
    r = await verifyBoth(log, cps);
    assert.deepEqual([r.firstBadSeq, r.problem], [10, 'leaf_hash_mismatch']);
  });
});

describe('consistency proofs over the admin API and the CLI', () => {
  let h: Harness;
  let token: string;
  const post = (p: string, body: unknown) =>
    fetch(`${h.server.url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: token },
      body: JSON.stringify(body),
    });
  before(async () => {
    h = await startHarness();
    await applyTileSchema(h.server.core.auditDb);
    token = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
  });
  after(async () => {
    await h?.close();
  });

  test('POST /admin/audit/consistency returns both signed heads and a proof that verifies', async () => {
    await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    const cp1 = (await (await post('/admin/audit/checkpoint', {})).json()) as { treeSize: number };
    for (let i = 0; i < 3; i++)
      await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    const cp2 = (await (await post('/admin/audit/checkpoint', {})).json()) as { treeSize: number };
    const res = await post('/admin/audit/consistency', { from: cp1.treeSize, to: cp2.treeSize });
    assert.equal(res.status, 200);
    const c = (await res.json()) as {
      from: { treeSize: number; rootHash: string; checkpoint: string };
      to: { treeSize: number; rootHash: string; checkpoint: string };
      proof: string[];
      verifierKey: string;
    };
    const root = (note: string) => parseCheckpoint(verifyNote(note, [c.verifierKey]).text).rootHash;
    assert.ok(
      verifyConsistency(
        c.from.treeSize,
        c.to.treeSize,
        c.proof.map((x) => Buffer.from(x, 'hex')),
        root(c.from.checkpoint),
        root(c.to.checkpoint),
      ),
    );
    for (const body of [
      { from: 'x' },
      { from: cp2.treeSize, to: cp1.treeSize },
      { from: 1, to: cp2.treeSize + 1000 },
      { from: 0 },
      {},
    ]) {
      const bad = await post('/admin/audit/consistency', body);
      assert.equal(bad.status, 400, JSON.stringify(body));
      const outcome = (await bad.json()) as { issue: { diagnostics?: string }[] };
      assert.ok(outcome.issue[0]?.diagnostics, 'the reason is given');
    }
  });
});

describe('custos audit prove --from/--to', () => {
  let storage: TestStorage;
  let env: Record<string, string>;
  before(async () => {
    storage = await createTestStorage();
    env = { ...storage.env, CUSTOS_PORT: '8080' };
  });
  after(async () => {
    await storage?.cleanup();
  });

  test('prints a consistency proof that verifies; bad input exits 2 with a reason', async () => {
    assert.equal((await runCustos(['init', '--json'], env)).code, 0);
    const cp1 = JSON.parse((await runCustos(['audit', 'checkpoint', '--json'], env)).stdout) as {
      treeSize: number;
      rootHash: string;
    };
    assert.equal((await runCustos(['init', '--json', '--new-secret'], env)).code, 0);
    const r = await runCustos(['audit', 'prove', '--from', String(cp1.treeSize), '--json'], env);
    assert.equal(r.code, 0, r.stderr);
    const c = JSON.parse(r.stdout) as {
      from: { treeSize: number; rootHash: string; checkpoint?: string };
      to: { treeSize: number; rootHash: string; checkpoint?: string };
      proof: string[];
    };
    assert.equal(c.from.rootHash, cp1.rootHash);
    assert.ok(c.to.treeSize > cp1.treeSize && c.to.checkpoint, 'to is the current log, newly signed');
    const hex = (x: string) => Buffer.from(x, 'hex');
    assert.ok(
      verifyConsistency(
        c.from.treeSize,
        c.to.treeSize,
        c.proof.map(hex),
        hex(c.from.rootHash),
        hex(c.to.rootHash),
      ),
    );
    const human = await runCustos(['audit', 'prove', '--from', '1', '--to', String(c.to.treeSize)], env);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /is a prefix of the tree of size/);
    // (--from 0 and a missing --from are refused the same way; the API test above covers the sizes.)
    for (const args of [
      ['--from', 'x'],
      ['--from', '5', '--to', '3'],
      ['--from', '1', '--to', '999999'],
      ['--seq', '1', '--from', '1'],
    ]) {
      const bad = await runCustos(['audit', 'prove', ...args], env);
      assert.equal(bad.code, 2, `${args.join(' ')}: ${bad.stderr}`);
      assert.match(bad.stderr, /custos: /);
      assert.equal(bad.stdout, '');
    }
  });
});
