import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, hash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createTestStorage, serverUrl, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';
import { startHarness } from './support/harness.ts';
import { ConfigError, loadConfig } from '../src/config/config.ts';
import { dataPaths } from '../src/server.ts';
import { silentLogger } from '../src/log/logger.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { AuditLog } from '../src/audit/audit-log.ts';
import { Checkpoints } from '../src/audit/checkpoints.ts';
import { canonicalJson, encodeAuditEvent, leafHash, type AuditEvent } from '../src/audit/audit-event.ts';
import {
  entryIndexRecords,
  indexColumns,
  indexRowsOf,
  INDEX_COLUMNS,
  unnestIndexColumns,
} from '../src/audit/audit-index.ts';
import { treeHead, verifyInclusion } from '../src/audit/merkle-proof.ts';
import { packRows, processBatch } from '../src/audit/verify-batch.ts';
import {
  parseArchiveBefore,
  retentionCutoff,
  verifyArchiveDir,
  type ArchiveResult,
} from '../src/audit/audit-retention.ts';
import type { AuditVerifyReport } from '../src/audit/audit-verify.ts';

// Retention and archival of the audit log (docs/audit.md, "Retention"): nothing younger than the
// retention period (six years at least) can be removed, archives keep the tree verifiable, and a
// tampered archive or a forged watermark is caught. Runs on the configured storage: embedded PGlite
// (no roles: the owner checks only), or a PostgreSQL server with an application role from
// `custos audit setup` that must not be able to delete anything.

const YEAR_MS = 365.25 * 86_400_000;
const ORIGIN = '127.0.0.1:0/custos/audit'; // the server's origin with CUSTOS_PORT=0 (server.ts)
const OLD = 600; // entries seven years old
const NEW = 300; // entries of today
const appRole = `custos_test_retention_${randomBytes(4).toString('hex')}`;

/** A gateway-like event of synthetic ids only. */
function event(i: number, time: Date): AuditEvent {
  return {
    v: 1,
    id: randomUUID(),
    time: time.toISOString(),
    phase: 'access',
    action: 'read',
    outcome: 'success',
    requestId: randomUUID(),
    projectId: 'test-project',
    actor: { clientId: 'test-client', roles: [] },
    purpose: 'TREAT',
    resource: { type: 'Patient', id: `test-patient-${i % 7}`, version: '1' },
    patients: [`test-patient-${i % 7}`],
    source: { ip: '127.0.0.1' },
  };
}

/**
 * Appends events as the sequencer would (entry, leaf hash, index rows), but with the given
 * `recorded_at`: what a log written years ago looks like. Through the owner's connection.
 */
async function seed(db: SqlDriver, events: AuditEvent[], recordedAt: Date[]): Promise<void> {
  const start = Number(
    (await db.query<{ n: number }>('SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_entry')).rows[0]!.n,
  );
  const entries = events.map(encodeAuditEvent);
  await db.query(
    `INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase, recorded_at)
     SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[], $4::text[], $5::text[], $6::timestamptz[])`,
    [
      events.map((_, i) => start + i),
      entries,
      entries.map(leafHash),
      events.map((e) => e.requestId),
      events.map((e) => e.phase),
      recordedAt,
    ],
  );
  const rows = events.flatMap((e, i) => indexRowsOf(e).map((r) => ({ ...r, seq: start + i })));
  await db.query(
    `INSERT INTO audit_index (${INDEX_COLUMNS}) SELECT * FROM ${unnestIndexColumns(1)}`,
    indexColumns(rows),
  );
}

async function sqlstate(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (e) {
    return (e as { code?: string }).code ?? 'no-code';
  }
}

function parse<T>(stdout: string): T {
  return JSON.parse(stdout) as T;
}

describe('CUSTOS_AUDIT_RETENTION_YEARS', () => {
  test('defaults to six years; less is refused at start, naming the rule', () => {
    assert.equal(loadConfig({}).auditRetentionYears, 6);
    assert.equal(loadConfig({ CUSTOS_AUDIT_RETENTION_YEARS: '10' }).auditRetentionYears, 10);
    for (const bad of ['5', '0', '-6', 'six', '6.5']) {
      assert.throws(
        () => loadConfig({ CUSTOS_AUDIT_RETENTION_YEARS: bad }),
        (e: unknown) =>
          e instanceof ConfigError &&
          e.variable === 'CUSTOS_AUDIT_RETENTION_YEARS' &&
          e.message.includes('45 CFR 164.316(b)(2)'),
        bad,
      );
    }
  });

  test('--before dates and the retention cutoff', () => {
    assert.equal(parseArchiveBefore('2019-06-30')?.toISOString(), '2019-06-30T00:00:00.000Z');
    assert.equal(parseArchiveBefore('2019-06-30T12:00:00+02:00')?.toISOString(), '2019-06-30T10:00:00.000Z');
    for (const bad of ['2019-02-30', '2019-6-30', 'last year', '2019-06-30T12:00:00', '']) {
      assert.equal(parseArchiveBefore(bad), undefined, bad);
    }
    assert.equal(
      retentionCutoff(new Date('2026-12-01T08:00:00Z'), 6).toISOString(),
      '2020-12-01T08:00:00.000Z',
    );
  });
});

describe('audit archival beyond the retention period', () => {
  let storage: TestStorage;
  let env: Record<string, string>;
  /** The owner of the audit tables (a superuser here), and the URL `custos audit archive` is given. */
  let ownerUrl: string | undefined;
  let appUrl: string | undefined;
  let work: string;
  const adminArgs = () => (ownerUrl ? ['--admin-url', ownerUrl] : []);
  const openOwner = async (): Promise<SqlDriver> =>
    ownerUrl ? PgDriver.open(ownerUrl, { max: 2 }) : PgliteDriver.open(path.join(storage.dataDir, 'audit'));
  const sevenYearsAgo = new Date(Date.now() - 7 * YEAR_MS);
  const beforeOk = new Date(Date.now() - 6.5 * YEAR_MS).toISOString().slice(0, 10);
  let headBefore: { size: number; rootHash: string };
  let archive: ArchiveResult;

  before(async () => {
    storage = await createTestStorage();
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-retention-'));
    env = { ...storage.env, CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0' };
    if (storage.kind === 'postgres') {
      ownerUrl = storage.auditDatabaseUrl!;
      const setup = await runCustos(
        ['audit', 'setup', '--admin-url', ownerUrl, '--app-role', appRole, '--json'],
        env,
      );
      assert.equal(setup.code, 0, setup.stderr);
      appUrl = parse<{ appDatabaseUrl: string }>(setup.stdout).appDatabaseUrl;
      // Custos itself runs as the application role from now on.
      env.CUSTOS_AUDIT_DATABASE_URL = appUrl;
    }
    // A log that began seven years ago: OLD entries then (with a checkpoint then, which stores their
    // tiles), then NEW entries of today through the real sequencer, and a checkpoint now.
    const db = await openOwner();
    try {
      await prepareAuditSchema(db, { production: false, log: silentLogger });
      await seed(
        db,
        Array.from({ length: OLD }, (_, i) => event(i, new Date(sevenYearsAgo.getTime() + i * 1000))),
        Array.from({ length: OLD }, (_, i) => new Date(sevenYearsAgo.getTime() + i * 1000)),
      );
      const log = new AuditLog(db);
      const cps = new Checkpoints({
        audit: log,
        keyFile: dataPaths(storage.dataDir).auditCheckpointKey,
        origin: ORIGIN,
      });
      await cps.checkpoint();
      for (let i = 0; i < NEW; i++) await log.append(event(OLD + i, new Date()));
      const cp = await cps.checkpoint();
      headBefore = { size: cp.treeSize, rootHash: cp.rootHash };
    } finally {
      await db.close();
    }
  });

  after(async () => {
    await storage?.cleanup();
    fs.rmSync(work, { recursive: true, force: true });
    if (serverUrl && appUrl) {
      const c = new pg.Client({ connectionString: serverUrl });
      await c.connect();
      await c.query(`DROP ROLE IF EXISTS ${appRole}`);
      await c.end();
    }
  });

  test('a retention below six years, or a --before inside the retention period, is refused; nothing moves', async () => {
    const out = path.join(work, 'refused');
    const five = await runCustos(['audit', 'archive', '--before', beforeOk, '--out', out, ...adminArgs()], {
      ...env,
      CUSTOS_AUDIT_RETENTION_YEARS: '5',
    });
    assert.equal(five.code, 2, five.stderr);
    assert.match(five.stderr, /CUSTOS_AUDIT_RETENTION_YEARS.*45 CFR 164\.316\(b\)\(2\)/);

    const lastYear = new Date(Date.now() - YEAR_MS).toISOString().slice(0, 10);
    const young = await runCustos(
      ['audit', 'archive', '--before', lastYear, '--out', out, ...adminArgs()],
      env,
    );
    assert.equal(young.code, 2, young.stderr);
    assert.match(young.stderr, /within the retention period of 6 years \(45 CFR 164\.316\(b\)\(2\)\)/);
    const youngest = /the youngest date allowed is (\S+)/.exec(young.stderr)?.[1];
    assert.ok(youngest, young.stderr);
    assert.ok(Math.abs(Date.parse(youngest) - retentionCutoff(new Date(), 6).getTime()) < 600_000);

    // A longer configured retention moves the limit.
    const ten = await runCustos(['audit', 'archive', '--before', beforeOk, '--out', out, ...adminArgs()], {
      ...env,
      CUSTOS_AUDIT_RETENTION_YEARS: '10',
    });
    assert.equal(ten.code, 2, ten.stderr);
    assert.match(ten.stderr, /retention period of 10 years/);

    const bad = await runCustos(
      ['audit', 'archive', '--before', 'yesterday', '--out', out, ...adminArgs()],
      env,
    );
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--before must be a date/);
    if (ownerUrl) {
      const none = await runCustos(['audit', 'archive', '--before', beforeOk, '--out', out], env);
      assert.equal(none.code, 2);
      assert.match(none.stderr, /--admin-url is required/);
    }
    assert.equal(fs.existsSync(out), false, 'no archive written');
    const db = await openOwner();
    try {
      const n = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM audit_entry');
      assert.equal(Number(n.rows[0]!.n), OLD + NEW);
    } finally {
      await db.close();
    }
  });

  test('the database refuses to remove entries younger than six years, even to the owner', async () => {
    const db = await openOwner();
    try {
      // A DELETE without an archive is refused; so is one below no watermark with the setting forged.
      assert.equal(await sqlstate(db.query('DELETE FROM audit_entry WHERE seq = 0')), 'P0001');
      assert.equal(await sqlstate(db.query('DELETE FROM audit_index WHERE seq = 0')), 'P0001');
      assert.equal(await sqlstate(db.query('TRUNCATE audit_entry')), 'P0001');
      const forged = await sqlstate(
        db.transaction(async (tx) => {
          await tx.query("SELECT set_config('custos.audit_archive', '768', true)");
          await tx.query('DELETE FROM audit_entry WHERE seq < 768');
        }),
      );
      assert.equal(forged, 'P0001');
      // A watermark over today's entries is refused by its trigger (recorded_at within six years).
      const young = await sqlstate(
        db.query(
          `INSERT INTO audit_archive (archived_before, archived_from, root_hash, manifest_sha256, note, record_seq, retention_years)
           VALUES (768, 0, $1, $1, 'x', 800, 6)`,
          [Buffer.alloc(32)],
        ),
      );
      assert.equal(young, 'P0001');
      const short = await sqlstate(
        db.query(
          `INSERT INTO audit_archive (archived_before, archived_from, root_hash, manifest_sha256, note, record_seq, retention_years)
           VALUES (256, 0, $1, $1, 'x', 800, 5)`,
          [Buffer.alloc(32)],
        ),
      );
      assert.equal(short, '23514', 'retention_years < 6 violates the check constraint');
      const n = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM audit_entry');
      assert.equal(Number(n.rows[0]!.n), OLD + NEW);
    } finally {
      await db.close();
    }
  });

  test('a SIEM destination behind the range stops the archive unless --allow-unforwarded', async () => {
    const db = await openOwner();
    try {
      await db.query("INSERT INTO audit_siem_cursor (destination, next_seq) VALUES ('test-siem', 100)");
    } finally {
      await db.close();
    }
    const out = path.join(work, 'unforwarded');
    const r = await runCustos(['audit', 'archive', '--before', beforeOk, '--out', out, ...adminArgs()], env);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /SIEM destination test-siem has confirmed entries up to 100 only/);
    assert.equal(fs.existsSync(out), false);
  });

  test('old entries are archived with their proofs, the log still verifies, kept entries still prove', async () => {
    const out = path.join(work, 'archive-1');
    const r = await runCustos(
      [
        'audit',
        'archive',
        '--before',
        beforeOk,
        '--out',
        out,
        '--allow-unforwarded',
        '--json',
        ...adminArgs(),
      ],
      env,
    );
    assert.equal(r.code, 0, r.stderr);
    archive = parse<ArchiveResult>(r.stdout);
    // A prefix in whole tiles: 512 of the 600 old entries; the 88 others wait for a full tile.
    assert.equal(archive.from, 0);
    assert.equal(archive.to, 512);
    assert.equal(archive.archived, 512);
    assert.equal(archive.recordSeq, OLD + NEW);
    assert.equal(archive.indexRowsRemoved, 512);
    assert.equal(archive.head?.treeSize, OLD + NEW);
    assert.equal(archive.head?.rootHash, headBefore.rootHash, 'the signed head is the one before archiving');

    const files = fs.readdirSync(out).sort();
    for (const f of [
      'SHA256SUMS',
      'archive.note',
      'checkpoint',
      'consistency.json',
      'entries.jsonl',
      'manifest.json',
      'tile',
      'verifier.key',
    ])
      assert.ok(files.includes(f), f);
    assert.equal(fs.readFileSync(path.join(out, 'entries.jsonl'), 'utf8').split('\n').length, 513);
    assert.equal(fs.statSync(path.join(out, 'tile', '0', '001')).size, 8192);
    // sha256sum -c SHA256SUMS, by hand.
    for (const line of fs.readFileSync(path.join(out, 'SHA256SUMS'), 'utf8').trim().split('\n')) {
      const [sum, file] = line.split('  ') as [string, string];
      assert.equal(
        createHash('sha256')
          .update(fs.readFileSync(path.join(out, file)))
          .digest('hex'),
        sum,
        file,
      );
    }

    const db = await openOwner();
    try {
      const left = await db.query<{ lo: number; n: number }>(
        'SELECT min(seq) AS lo, count(*)::int AS n FROM audit_entry',
      );
      assert.equal(Number(left.rows[0]!.lo), 512);
      assert.equal(Number(left.rows[0]!.n), OLD + NEW + 1 - 512);
      const idx = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM audit_index WHERE seq < 512');
      assert.equal(Number(idx.rows[0]!.n), 0);
      const tiles = await db.query<{ n: number }>(
        'SELECT count(*)::int AS n FROM audit_tile WHERE level = 0',
      );
      assert.equal(Number(tiles.rows[0]!.n), 3, 'the tiles stay');
      const record = await db.query<{ entry: Uint8Array }>('SELECT entry FROM audit_entry WHERE seq = $1', [
        archive.recordSeq,
      ]);
      const e = JSON.parse(Buffer.from(record.rows[0]!.entry).toString('utf8')) as AuditEvent;
      assert.equal(e.action, 'admin');
      assert.equal(e.code, 'audit.archived');
      assert.deepEqual(e.resource, { type: 'AuditArchive', id: '0-512', version: archive.manifestSha256 });
      assert.equal(e.count, 512);
      assert.ok(e.actor.userId, 'who archived');
    } finally {
      await db.close();
    }

    const v = await runCustos(['audit', 'verify', '--json'], env);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    const report = parse<AuditVerifyReport>(v.stdout);
    assert.equal(report.ok, true);
    assert.equal(report.size, OLD + NEW + 1);
    assert.equal(report.archive?.archivedBefore, 512);
    assert.equal(report.archive?.notesChecked, true);
    assert.equal(report.archive?.archives[0]?.manifestSha256, archive.manifestSha256);
    assert.equal(
      report.checkpoints?.firstBadTreeSize,
      undefined,
      'the checkpoints signed before still verify',
    );
    assert.ok((report.checkpoints?.checked ?? 0) >= 2);
    const human = await runCustos(['audit', 'verify'], env);
    assert.match(human.stdout, /entries 0 to 511 are archived/);

    // A kept entry proves against a checkpoint; an archived one too, from its stored tile, and the
    // proven leaf is the archive's line.
    for (const seq of [700, 5]) {
      const p = await runCustos(['audit', 'prove', '--seq', String(seq), '--json'], env);
      assert.equal(p.code, 0, p.stderr);
      const proof = parse<{ leafHash: string; proof: string[]; treeSize: number; rootHash: string }>(
        p.stdout,
      );
      const hex = (s: string) => Buffer.from(s, 'hex');
      assert.ok(
        verifyInclusion(seq, proof.treeSize, hex(proof.leafHash), proof.proof.map(hex), hex(proof.rootHash)),
      );
      if (seq < 512) {
        const line = fs.readFileSync(path.join(out, 'entries.jsonl'), 'utf8').split('\n')[seq]!;
        assert.equal(leafHash(Buffer.from(line)).toString('hex'), proof.leafHash);
      }
    }
    const read = await runCustos(['audit', 'prove', '--from', '512', '--json'], env);
    assert.equal(read.code, 0, read.stderr);

    const withArchive = await runCustos(['audit', 'verify', '--archive', out, '--json'], env);
    assert.equal(withArchive.code, 0, withArchive.stdout + withArchive.stderr);
    const checked = parse<{
      ok: boolean;
      archiveCheck: { ok: boolean; verifiedWith: string; entries: number };
    }>(withArchive.stdout);
    assert.equal(checked.archiveCheck.ok, true);
    assert.equal(checked.archiveCheck.verifiedWith, 'log');
    assert.equal(checked.archiveCheck.entries, 512);
    // The archive also checks on its own (with its own verifier key), without the log.
    assert.equal((await verifyArchiveDir(out)).ok, true);
  });

  test('entries of today are never archived, even when they would complete a tile', async () => {
    // Entries 512..599 are old, 600.. are today's: no whole tile of old entries is left.
    const out = path.join(work, 'archive-2');
    const r = await runCustos(
      [
        'audit',
        'archive',
        '--before',
        beforeOk,
        '--out',
        out,
        '--allow-unforwarded',
        '--json',
        ...adminArgs(),
      ],
      env,
    );
    assert.equal(r.code, 0, r.stderr);
    const res = parse<ArchiveResult>(r.stdout);
    assert.equal(res.archived, 0);
    assert.deepEqual(res.stoppedAt, { seq: OLD, reason: 'it is not older than --before' });
    assert.equal(fs.existsSync(path.join(out, 'manifest.json')), false);
  });

  test('verify --archive catches a tampered archive, also one whose manifest was fixed up', async () => {
    const out = path.join(work, 'archive-1');
    const copy = (name: string) => {
      const dir = path.join(work, name);
      fs.cpSync(out, dir, { recursive: true });
      return dir;
    };
    // One changed entry: its file no longer matches the manifest, its leaf hash no longer the tile.
    const t1 = copy('tampered-entry');
    const file = path.join(t1, 'entries.jsonl');
    fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('"test-patient-3"', '"test-patient-4"'));
    const r1 = await runCustos(['audit', 'verify', '--archive', t1, '--json'], env);
    assert.equal(r1.code, 1, r1.stderr);
    const p1 = parse<{ ok: boolean; archiveCheck: { problems: string[] } }>(r1.stdout);
    assert.equal(p1.ok, false);
    assert.ok(p1.archiveCheck.problems.some((p) => /entries\.jsonl does not match its SHA-256/.test(p)));
    assert.ok(p1.archiveCheck.problems.some((p) => /entry 3 .* does not match its leaf hash/.test(p)));

    // The same, with the manifest's line for it recomputed: the signed note and the log's record of
    // the archive name the original manifest.
    const t2 = copy('tampered-manifest');
    const f2 = path.join(t2, 'entries.jsonl');
    fs.writeFileSync(f2, fs.readFileSync(f2, 'utf8').replace('"test-patient-3"', '"test-patient-4"'));
    const manifest = JSON.parse(fs.readFileSync(path.join(t2, 'manifest.json'), 'utf8')) as {
      files: { path: string; bytes: number; sha256: string }[];
    };
    const data = fs.readFileSync(f2);
    const entry = manifest.files.find((f) => f.path === 'entries.jsonl')!;
    entry.bytes = data.length;
    entry.sha256 = hash('sha256', data, 'hex');
    fs.writeFileSync(path.join(t2, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    const r2 = await runCustos(['audit', 'verify', '--archive', t2], env);
    assert.equal(r2.code, 1);
    assert.match(r2.stdout, /archive .* BROKEN: .*archive\.note does not verify/);
    assert.match(r2.stdout, /the log's record of entries 0 to 511 names another archive/);
    // Offline, with the archive's own key: still caught by the leaf hashes.
    const offline = await verifyArchiveDir(t2);
    assert.equal(offline.ok, false);
    assert.ok(offline.problems.some((p) => /does not match its leaf hash/.test(p)));

    // A missing tile.
    const t3 = copy('missing-tile');
    fs.rmSync(path.join(t3, 'tile', '0', '001'));
    assert.ok((await verifyArchiveDir(t3)).problems.some((p) => /tile\/0\/001 is missing/.test(p)));
  });

  test('through a running server: verify --archive uses its admin API; embedded archival waits for it to stop', async () => {
    const h = await startHarness({
      storage,
      env: {
        CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0',
        ...(appUrl ? { CUSTOS_AUDIT_DATABASE_URL: appUrl } : {}),
      },
    });
    try {
      const live = { ...env, CUSTOS_PORT: String(new URL(h.server.url).port) };
      const v = await runCustos(
        ['audit', 'verify', '--archive', path.join(work, 'archive-1'), '--json'],
        live,
      );
      assert.equal(v.code, 0, v.stdout + v.stderr);
      assert.match(v.stderr, /using the running server's admin API/);
      const r = parse<AuditVerifyReport & { archiveCheck: { ok: boolean } }>(v.stdout);
      assert.equal(r.archive?.archivedBefore, 512);
      assert.equal(r.archiveCheck.ok, true);
      const a = await runCustos(
        [
          'audit',
          'archive',
          '--before',
          beforeOk,
          '--out',
          path.join(work, 'while-running'),
          '--allow-unforwarded',
          '--json',
          ...adminArgs(),
        ],
        live,
      );
      if (storage.kind === 'embedded') {
        assert.equal(a.code, 2, a.stderr);
        assert.match(a.stderr, /a server runs on this data directory.*stop it first/);
      } else {
        // A server keeps running while the administrative role archives (nothing is due here).
        assert.equal(a.code, 0, a.stderr);
        assert.equal(parse<ArchiveResult>(a.stdout).archived, 0);
      }
    } finally {
      await h.close();
    }
  });

  test(
    'the application role still cannot delete, archive or forge a watermark',
    { skip: !serverUrl && 'embedded storage has no roles' },
    async () => {
      const c = new pg.Client({ connectionString: appUrl });
      await c.connect();
      try {
        assert.equal((await c.query('SELECT current_user AS u')).rows[0].u, appRole);
        const count = async () =>
          Number((await c.query<{ n: number }>('SELECT count(*)::int AS n FROM audit_entry')).rows[0]!.n);
        const before = await count();
        await c.query("SET custos.audit_archive = '1024'");
        assert.equal(await sqlstate(c.query('DELETE FROM audit_entry WHERE seq < 1024')), '42501');
        assert.equal(await sqlstate(c.query('DELETE FROM audit_index WHERE seq < 1024')), '42501');
        assert.equal(await sqlstate(c.query('UPDATE audit_archive SET archived_by = archived_by')), '42501');
        assert.equal(await sqlstate(c.query('DELETE FROM audit_archive')), '42501');
        assert.equal(
          await sqlstate(
            c.query(
              `INSERT INTO audit_archive (archived_before, archived_from, root_hash, manifest_sha256, note, record_seq, retention_years)
             VALUES (768, 512, $1, $1, 'x', 900, 6)`,
              [Buffer.alloc(32)],
            ),
          ),
          '42501',
        );
        assert.equal(await sqlstate(c.query('ALTER TABLE audit_entry DISABLE TRIGGER ALL')), '42501');
        assert.equal(await count(), before);
        const lo = await c.query<{ lo: number }>('SELECT min(seq) AS lo FROM audit_entry');
        assert.equal(Number(lo.rows[0]!.lo), 512);
      } finally {
        await c.end();
      }
      // And `custos audit archive` pointed at the application role gets a clear refusal, not a crash.
      const r = await runCustos(
        [
          'audit',
          'archive',
          '--before',
          beforeOk,
          '--out',
          path.join(work, 'as-app'),
          '--admin-url',
          appUrl!,
        ],
        env,
      );
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /does not own the audit tables/);
    },
  );

  test('verify catches entries removed behind a forged watermark, and a changed archived tile', async () => {
    // A superuser who deletes kept entries and records a watermark for them cannot sign its note.
    const db = await openOwner();
    try {
      // The real tree head at 768 (from the tiles), so that only the signed note gives it away.
      const root = await treeHead(
        new Checkpoints({
          audit: new AuditLog(db),
          keyFile: path.join(work, 'unused.skey'),
          origin: ORIGIN,
        }).tiles.source(),
        768,
      );
      await db.transaction(async (tx) => {
        await tx.query('ALTER TABLE audit_entry DISABLE TRIGGER USER');
        await tx.query('ALTER TABLE audit_index DISABLE TRIGGER USER');
        await tx.query('ALTER TABLE audit_archive DISABLE TRIGGER USER');
        const head = await tx.query<{ root: Uint8Array }>(
          'SELECT root FROM audit_tile WHERE level = 0 AND idx = 2',
        );
        assert.ok(head.rows[0]);
        await tx.query('DELETE FROM audit_index WHERE seq >= 512 AND seq < 768');
        await tx.query('DELETE FROM audit_entry WHERE seq >= 512 AND seq < 768');
        await tx.query(
          `INSERT INTO audit_archive (archived_before, archived_from, root_hash, manifest_sha256, note, record_seq, retention_years)
           SELECT 768, 512, $2, manifest_sha256, note, $1, 6 FROM audit_archive WHERE archived_before = 512`,
          [archive.recordSeq, root],
        );
        await tx.query('ALTER TABLE audit_entry ENABLE TRIGGER USER');
        await tx.query('ALTER TABLE audit_index ENABLE TRIGGER USER');
        await tx.query('ALTER TABLE audit_archive ENABLE TRIGGER USER');
      });
    } finally {
      await db.close();
    }
    const v = await runCustos(['audit', 'verify', '--json'], env);
    assert.equal(v.code, 1, v.stderr);
    const r = parse<AuditVerifyReport>(v.stdout);
    assert.equal(r.ok, false);
    assert.equal(r.archive?.firstBad?.archivedBefore, 768);
    assert.match(r.archive.firstBad.problem, /signed note/);
    const human = await runCustos(['audit', 'verify'], env);
    assert.match(human.stdout, /audit log BROKEN: the archive of the entries before 768 does not check out/);

    // A changed leaf hash in an archived tile no longer gives the signed heads.
    const db2 = await openOwner();
    try {
      await db2.transaction(async (tx) => {
        await tx.query('ALTER TABLE audit_tile DISABLE TRIGGER USER');
        await tx.query(
          `UPDATE audit_tile SET hashes = set_byte(hashes, 32, (get_byte(hashes, 32) + 1) % 256) WHERE level = 0 AND idx = 0`,
        );
        await tx.query('ALTER TABLE audit_tile ENABLE TRIGGER USER');
      });
    } finally {
      await db2.close();
    }
    const v2 = parse<AuditVerifyReport>((await runCustos(['audit', 'verify', '--json'], env)).stdout);
    assert.equal(v2.ok, false);
    assert.ok(v2.tiles.firstBad || v2.checkpoints?.firstBadTreeSize !== undefined, JSON.stringify(v2.tiles));
  });
});

describe("verify reads each entry once: the index rows from the scan equal the parse's", () => {
  const PIECES = [
    '"',
    '\\',
    '\\u00e9',
    '{',
    '}',
    '[',
    ']',
    ',',
    ':',
    ' ',
    'é',
    '\u00ff',
    '0',
    'null',
    '"time":"2020-01-01T00:00:00Z",',
    '"time":"2020-01-01T00:00:59.999Z",',
    '"time":"2020-01-01T24:00:00.000Z",',
    '"time":"2020-02-30T00:00:00.000Z",',
    '"time":5,',
    '"time":"2020-01-01T00:00:00\\u005a",',
    '"action":"x",',
    '"action":["x"],',
    '"actor":{"clientId":"c2"},',
    '"actor":{"client\\u0049d":"c3"},',
    '"actor":[1],',
    '"actor":null,',
    '"actor":{"userId":"u","userId":"v"},',
    '"patients":["p2","p1","p2",""],',
    '"patients":"p",',
    '"patients":[["a"],{"b":1},"😀","\\u00e9"],',
    '"patients":[],',
    '"patients":["\uffff","z","é"],',
    '"outcome":{"a":"b"},',
    '"purpose":"\\"q\\"",',
    '"projectId":"é€",',
    '"projectId":"a b",',
  ];
  const FIELDS = PIECES.findIndex((p) => p.startsWith('"time"'));

  function sample(i: number): Buffer {
    return Buffer.from(
      canonicalJson({
        v: 1,
        id: randomUUID(),
        time: new Date(Date.UTC(2020, 0, 1) + i * 7_919).toISOString(),
        phase: ['access', 'attempt', 'outcome'][i % 3],
        action: 'read',
        outcome: 'success',
        requestId: randomUUID(),
        projectId: randomUUID(),
        actor: i % 2 ? { clientId: randomUUID(), roles: ['a'] } : { userId: 'test-user', clientId: 'c' },
        purpose: 'TREAT',
        patients: i % 4 === 0 ? [randomUUID(), randomUUID(), 'test-a', 'test-a'] : [randomUUID()],
        source: { ip: '127.0.0.1' },
      }),
    );
  }

  function mutate(entry: Buffer): Buffer {
    const at = Math.floor(Math.random() * (entry.length + 1));
    const r = Math.random();
    const piece = (from: number) =>
      Buffer.from(PIECES[from + Math.floor(Math.random() * (PIECES.length - from))]!);
    if (r < 0.35) return Buffer.concat([entry.subarray(0, at), piece(0), entry.subarray(at)]);
    if (r < 0.55)
      return Buffer.concat([entry.subarray(0, at), entry.subarray(at + 1 + Math.floor(Math.random() * 3))]);
    if (r < 0.65) {
      const b = Buffer.from(entry);
      b[Math.floor(Math.random() * b.length)] = Math.floor(Math.random() * 256);
      return b;
    }
    // An index field (maybe repeated, maybe escaped) right after the opening brace.
    return Buffer.concat([Buffer.from('{'), piece(FIELDS), entry.subarray(1)]);
  }

  test('digests agree on ordinary entries and on thousands of mangled ones, alone and in a batch', () => {
    const cases: Buffer[] = [];
    for (let i = 0; i < 400; i++) cases.push(sample(i));
    for (let i = 0; i < 8000; i++) {
      let c = mutate(cases[Math.floor(Math.random() * cases.length)]!);
      if (Math.random() < 0.5) c = mutate(c);
      cases.push(c);
    }
    cases.push(Buffer.from('null'), Buffer.from('[]'), Buffer.from('{"patients":["\xff"]}', 'latin1'));
    for (const [i, entry] of cases.entries()) {
      const r = processBatch(packRows([{ seq: i, entry, leafHash: leafHash(entry) }]), 1, true);
      const want = hash('sha256', entryIndexRecords(i, entry, 0, entry.length), 'hex');
      assert.equal(r.indexDigest, want, entry.toString('latin1'));
    }
    const rows = cases.map((entry, seq) => ({ seq, entry, leafHash: leafHash(entry) }));
    const r = processBatch(packRows(rows), rows.length, true);
    const want = Buffer.concat(rows.map((x) => entryIndexRecords(x.seq, x.entry, 0, x.entry.length)));
    assert.equal(r.indexDigest, hash('sha256', want, 'hex'));
  });
});
