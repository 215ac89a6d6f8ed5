/**
 * Custos audit benchmark: `npm run -s bench:audit` (= node --import tsx bench/audit-bench.ts [flags]).
 *
 * On a PostgreSQL server (CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL), in fresh databases
 * custos_auditbench_<hex>_{res,audit,big} that are dropped at the end, it measures:
 *
 *   1. fsync: `pg_test_fsync` (from `pg_config --bindir`, if present) on a file in the system's
 *      temporary directory, and the latency of one tiny committed INSERT on the server, with
 *      `synchronous_commit` on and off (the difference is the server's WAL flush);
 *   2. durable appends through `AuditLog` (the production sequencer and group commit): many
 *      concurrent appenders, and one appender awaiting each append;
 *   3. the latency an audited PHI read adds: `PhiSession.read` of one Patient through two gateways
 *      on the same resource database, one with the real `AuditLog` and one whose `append` resolves at
 *      once (auditing disabled), alternating one by one in the same run; plus the append alone;
 *   4. verify: a log of --entries (default 10,000,000) valid canonical entries with their leaf hashes,
 *      written with COPY FROM STDIN (pg-copy-streams); the first checkpoint, which stores its tiles;
 *      then `verifyAuditLog` over it (entries/s), with and without the query index check, alternating
 *      --verify-runs times (the best of each is `verify` / `verifyWithoutIndex`; every run, with the
 *      CPU it took per entry, is in `verifyRuns`);
 *   5. proofs at that size with tiles: inclusion (`Checkpoints.prove`) and consistency
 *      (`Checkpoints.consistency`) latency and queries per proof.
 *
 * Prints ONE JSON document on stdout; progress goes to stderr. The bench, PostgreSQL and anything
 * else running share the machine's cores: every phase reports the load and the cores used by this
 * process, by PostgreSQL and by others.
 */
import { execFileSync } from 'node:child_process';
import { hash, randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { AuditLog } from '../src/audit/audit-log.ts';
import { canonicalJson, type AuditEvent } from '../src/audit/audit-event.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { indexCopyLines, INDEX_COLUMNS } from '../src/audit/audit-index.ts';
import { Checkpoints } from '../src/audit/checkpoints.ts';
import { TILE_MIGRATION_SQL } from '../src/audit/tiles.ts';
import { verifyConsistency, verifyInclusion } from '../src/audit/merkle-proof.ts';
import { loadConfig } from '../src/config/config.ts';
import { silentLogger } from '../src/log/logger.ts';
import { openCore } from '../src/server.ts';
import { PhiGateway, type Principal } from '../src/phi/gateway.ts';
import { initValidator, validateResource } from '../src/fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../src/fhir/resource-types.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import { splitSql } from '../src/store/migrations.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';

const { values: flags } = parseArgs({
  options: {
    entries: { type: 'string', default: '10000000' },
    'append-seconds': { type: 'string', default: '10' },
    concurrency: { type: 'string', default: '1024' },
    reads: { type: 'string', default: '2000' },
    proofs: { type: 'string', default: '200' },
    'fsync-seconds': { type: 'string', default: '1' },
    'verify-runs': { type: 'string', default: '1' },
    'skip-verify': { type: 'boolean', default: false },
    'only-verify': { type: 'boolean', default: false },
    'big-database': { type: 'string' },
    'keep-big': { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});
if (flags.help) {
  process.stderr.write(`usage: npm run -s bench:audit -- [--entries 10000000] [--append-seconds 10]
  [--concurrency 1024] [--reads 2000] [--proofs 200] [--fsync-seconds 1] [--verify-runs 1] [--skip-verify]
  [--only-verify] [--big-database NAME (reuse: seeded only if it has fewer entries)] [--keep-big]
Needs CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL (a PostgreSQL server).\n`);
  process.exit(0);
}
const int = (name: string, v: string | undefined) => {
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) {
    process.stderr.write(`audit-bench: --${name} must be a whole number\n`);
    process.exit(2);
  }
  return n;
};
const cfg = {
  entries: int('entries', flags.entries),
  appendSeconds: int('append-seconds', flags['append-seconds']),
  concurrency: int('concurrency', flags.concurrency),
  reads: int('reads', flags.reads),
  proofs: int('proofs', flags.proofs),
  fsyncSeconds: int('fsync-seconds', flags['fsync-seconds']),
  verifyRuns: Math.max(1, int('verify-runs', flags['verify-runs'])),
};
const baseUrl = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL;
if (!baseUrl) {
  process.stderr.write(
    'audit-bench: set CUSTOS_BENCH_DATABASE_URL (or CUSTOS_TEST_DATABASE_URL) to a PostgreSQL server\n',
  );
  process.exit(2);
}

const log = (s: string) => process.stderr.write(`${s}\n`);
const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d;

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.href;
}

async function adminQuery(sql: string): Promise<void> {
  const c = new pg.Client({ connectionString: baseUrl });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}

function latency(ms: number[]) {
  const s = [...ms].sort((a, b) => a - b);
  return {
    n: s.length,
    p50: round(percentile(s, 0.5), 3),
    p90: round(percentile(s, 0.9), 3),
    p99: round(percentile(s, 0.99), 3),
    mean: round(s.reduce((a, b) => a + b, 0) / Math.max(1, s.length), 3),
  };
}

// ---- CPU accounting: this process, PostgreSQL, everything else -------------------------------------

const TICK = 100; // USER_HZ
interface CpuSnap {
  at: number;
  machineBusy: number;
  machineTotal: number;
  self: number;
  /** Ticks of each PostgreSQL process (backends come and go: deltas are taken per process). */
  postgres: Map<string, number>;
}

function cpuSnap(): CpuSnap {
  const stat = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const idle = (stat[3] ?? 0) + (stat[4] ?? 0);
  const total = stat.reduce((a, b) => a + b, 0);
  const postgres = new Map<string, number>();
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const comm = s.slice(s.indexOf('(') + 1, s.lastIndexOf(')'));
      if (!comm.startsWith('postgres')) continue;
      const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
      postgres.set(pid, Number(f[11]) + Number(f[12]));
    } catch {
      /* gone */
    }
  }
  const u = process.cpuUsage();
  return {
    at: performance.now(),
    machineBusy: total - idle,
    machineTotal: total,
    self: ((u.user + u.system) / 1e6) * TICK,
    postgres,
  };
}

/** Cores used over the interval: by the machine, this process, PostgreSQL (backends that exited
 * during it are not counted) and everything else. */
function cpuDelta(a: CpuSnap, b: CpuSnap) {
  const seconds = (b.at - a.at) / 1000;
  const cores = (ticks: number) => round(ticks / TICK / seconds);
  const busy = round(
    ((b.machineBusy - a.machineBusy) / Math.max(1, b.machineTotal - a.machineTotal)) * os.cpus().length,
  );
  const self = cores(b.self - a.self);
  let pgTicks = 0;
  for (const [pid, t] of b.postgres) pgTicks += t - (a.postgres.get(pid) ?? 0);
  const postgres = cores(pgTicks);
  return {
    loadavg1: round(os.loadavg()[0]!),
    busyCores: busy,
    benchCores: self,
    postgresCores: postgres,
    otherCores: Math.max(0, round(busy - self - postgres)),
  };
}

async function phase<T>(
  name: string,
  fn: () => Promise<T>,
): Promise<T & { cpu: ReturnType<typeof cpuDelta> }> {
  log(
    `${name} (load ${os
      .loadavg()
      .map((x) => x.toFixed(2))
      .join(' ')})`,
  );
  // Each phase starts with no dirty buffers left by the one before: a checkpoint that the previous
  // phase's WAL (hundreds of MB of appends) forces in the middle of a latency phase would slow every
  // commit in it (seen: unaudited reads 0.25 ms p50 in one run, 0.58 ms in the next). Needs a
  // superuser (or pg_checkpoint); without one the phase runs as it is.
  await adminQuery('CHECKPOINT').catch(() => {});
  const a = cpuSnap();
  const r = await fn();
  const cpu = cpuDelta(a, cpuSnap());
  log(`  ${JSON.stringify(cpu)}`);
  return { ...r, cpu };
}

// ---- realistic audit events ------------------------------------------------------------------------

/**
 * An audit event as the gateway writes it: mostly reads; every 20th entry a write's attempt, and the
 * next one its outcome under the same request id.
 */
let attemptRequestId = randomUUID();
function gatewayEvent(i: number, projectId: string, clientId: string): AuditEvent {
  const kind = i % 20;
  const phase: AuditEvent['phase'] = kind === 0 ? 'attempt' : kind === 1 ? 'outcome' : 'access';
  if (kind === 0) attemptRequestId = randomUUID();
  return {
    v: 1,
    id: randomUUID(),
    time: new Date(1_780_000_000_000 + i).toISOString(),
    phase,
    action: phase === 'access' ? 'read' : 'create',
    outcome: phase === 'attempt' ? 'pending' : 'success',
    requestId: phase === 'access' ? randomUUID() : attemptRequestId,
    projectId,
    actor: { clientId, roles: [] },
    purpose: 'TREAT',
    resource: { type: 'Patient', id: randomUUID(), version: '1' },
    patients: [randomUUID()],
    source: { ip: '127.0.0.1' },
  };
}

// ---- 1. fsync ----------------------------------------------------------------------------------------

function pgTestFsync(): Record<string, unknown> {
  let bindir: string;
  try {
    bindir = execFileSync('pg_config', ['--bindir'], { encoding: 'utf8' }).trim();
  } catch {
    return { skipped: 'pg_config not found' };
  }
  const tool = path.join(bindir, 'pg_test_fsync');
  if (!fs.existsSync(tool)) return { skipped: `${tool} not found` };
  const file = path.join(os.tmpdir(), `custos-audit-bench-fsync-${process.pid}`);
  try {
    const out = execFileSync(tool, ['-s', String(Math.max(1, cfg.fsyncSeconds)), '-f', file], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    // First section: "Compare file sync methods using one 8kB write".
    const section = out.split(/\n\s*\n/).find((s) => /one 8kB write/.test(s)) ?? out;
    const methods: Record<string, number> = {};
    for (const m of section.matchAll(/^\s+(\S+)\s+([\d.]+) ops\/sec\s+([\d.]+) usecs\/op/gm)) {
      methods[m[1]!] = Number(m[3]);
    }
    return {
      tool,
      file: os.tmpdir(),
      usecsPerOp8kB: methods,
      fdatasyncMs: round((methods.fdatasync ?? NaN) / 1000, 3),
    };
  } catch (e) {
    return { skipped: `pg_test_fsync failed: ${e instanceof Error ? e.message.split('\n')[0] : 'error'}` };
  } finally {
    fs.rmSync(file, { force: true });
  }
}

async function committedInsert(url: string): Promise<Record<string, unknown>> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    await c.query('CREATE TABLE IF NOT EXISTS bench_fsync (id bigint)');
    const settings = await c.query<{ name: string; setting: string }>(
      `SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'shared_buffers')`,
    );
    const run = async (sync: 'on' | 'off') => {
      await c.query(`SET synchronous_commit = ${sync}`);
      const ms: number[] = [];
      for (let i = 0; i < 600; i++) {
        const t = performance.now();
        await c.query('INSERT INTO bench_fsync VALUES ($1)', [i]);
        if (i >= 100) ms.push(performance.now() - t);
      }
      return latency(ms);
    };
    const on = await run('on');
    const off = await run('off');
    await c.query('SET synchronous_commit = on');
    return {
      settings: Object.fromEntries(settings.rows.map((r) => [r.name, r.setting])),
      insertCommitMs: on,
      insertNoSyncCommitMs: off,
      walFlushP50Ms: round(on.p50 - off.p50, 3),
    };
  } finally {
    await c.end();
  }
}

// ---- 2. appends --------------------------------------------------------------------------------------

async function appends(url: string) {
  const db = await PgDriver.open(url, { max: 4 });
  await prepareAuditSchema(db, { production: false, log: silentLogger });
  const audit = new AuditLog(db);
  const projectId = randomUUID();
  const clientId = randomUUID();
  let i = 0;
  const run = async (concurrency: number) => {
    const deadline = performance.now() + cfg.appendSeconds * 1000;
    const ms: number[] = [];
    let n = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        while (performance.now() < deadline) {
          const t = performance.now();
          await audit.append(gatewayEvent(i++, projectId, clientId));
          ms.push(performance.now() - t);
          n++;
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    return {
      concurrency,
      appends: n,
      seconds: round(seconds),
      perSecond: Math.round(n / seconds),
      latencyMs: latency(ms),
    };
  };
  try {
    const batched = await phase(
      `appends: ${cfg.concurrency} concurrent appenders, ${cfg.appendSeconds} s`,
      () => run(cfg.concurrency),
    );
    const single = await phase(`appends: one at a time, ${cfg.appendSeconds} s`, () => run(1));
    return { batched, oneByOne: single, logSize: await audit.size() };
  } finally {
    await db.close();
  }
}

// ---- 3. audited read latency -------------------------------------------------------------------------

async function readLatency(resUrl: string, auditUrl: string) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-audit-bench-'));
  const config = loadConfig({
    CUSTOS_DATA_DIR: dataDir,
    CUSTOS_PORT: '0',
    CUSTOS_DATABASE_URL: resUrl,
    CUSTOS_AUDIT_DATABASE_URL: auditUrl,
  });
  const core = await openCore(config, silentLogger);
  try {
    initValidator();
    const init = await core.admin.init();
    const deps = {
      db: core.resourceDb,
      log: silentLogger,
      validate: validateResource,
      isResourceType,
      resourceTypes: RESOURCE_TYPES,
    };
    const audited = new PhiGateway({ ...deps, audit: core.audit });
    const noAudit = new PhiGateway({ ...deps, audit: { append: async () => 0 } as unknown as AuditLog });
    const principal: Principal = {
      projectId: init.projectId,
      clientId: init.clientId,
      roles: [],
      allowedPurposes: ['TREAT'],
      mayBreakGlass: false,
      can: () => true,
    };
    const facts = () => ({ requestId: randomUUID(), sourceIp: '127.0.0.1', purposeHeader: 'TREAT' });
    const created = await audited.session(principal, facts()).create('Patient', {
      resourceType: 'Patient',
      meta: { security: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' }] },
      name: [{ family: 'Testpatient', given: ['Zzyzx'] }],
      gender: 'other',
      birthDate: '1970-01-01',
    });
    const id = created.version!.id;
    const read = async (g: PhiGateway) => {
      const t = performance.now();
      const r = await g.session(principal, facts()).read('Patient', id);
      if (r.status !== 200) throw new Error(`read returned ${r.status}`);
      return performance.now() - t;
    };
    for (let i = 0; i < 200; i++) {
      await read(audited);
      await read(noAudit);
    }
    return await phase(
      `audited vs unaudited read of one Patient, ${cfg.reads} each, alternating`,
      async () => {
        const on: number[] = [];
        const off: number[] = [];
        const append: number[] = [];
        for (let i = 0; i < cfg.reads; i++) {
          on.push(await read(audited));
          off.push(await read(noAudit));
          if (i % 4 === 0) {
            const t = performance.now();
            await core.audit.append(gatewayEvent(i, init.projectId, init.clientId));
            append.push(performance.now() - t);
          }
        }
        const a = latency(on);
        const b = latency(off);
        return {
          auditedReadMs: a,
          unauditedReadMs: b,
          addedP50Ms: round(a.p50 - b.p50, 3),
          singleAppendMs: latency(append),
        };
      },
    );
  } finally {
    await core.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}

// ---- 4. seed, checkpoint, verify ---------------------------------------------------------------------

/** Writes n valid entries (canonical JSON, leaf hash) with COPY FROM STDIN (binary). */
async function seed(url: string, n: number): Promise<void> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    // The request-id index is rebuilt once at the end rather than maintained row by row.
    await c.query('DROP INDEX IF EXISTS audit_entry_request');
    const stream = c.query(
      copyFrom('COPY audit_entry (seq, entry, leaf_hash, request_id, phase) FROM STDIN (FORMAT binary)'),
    );
    const done = new Promise<void>((resolve, reject) => {
      stream.on('finish', resolve);
      stream.on('error', reject);
    });
    stream.write(Buffer.concat([Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1'), Buffer.alloc(8)]));
    // The query index rows of each entry (audit-index.ts), in a second COPY on a second connection.
    const ci = new pg.Client({ connectionString: url });
    await ci.connect();
    const index = ci.query(copyFrom(`COPY audit_index (${INDEX_COLUMNS}) FROM STDIN`));
    const indexDone = new Promise<void>((resolve, reject) => {
      index.on('finish', resolve);
      index.on('error', reject);
    });
    let indexRows = '';
    const projectId = randomUUID();
    const clientId = randomUUID();
    const scratch = Buffer.alloc(64 * 1024);
    let chunk = Buffer.allocUnsafe(4 << 20);
    let o = 0;
    const t0 = performance.now();
    for (let i = 0; i < n; i++) {
      const e = gatewayEvent(i, projectId, clientId);
      indexRows += indexCopyLines(i, e);
      if (indexRows.length > 1 << 22) {
        if (!index.write(indexRows)) await new Promise((r) => index.once('drain', r));
        indexRows = '';
      }
      const entry = Buffer.from(canonicalJson(e), 'utf8');
      scratch[0] = 0;
      entry.copy(scratch, 1);
      const leaf = hash('sha256', scratch.subarray(0, entry.length + 1), 'buffer');
      const rid = Buffer.from(e.requestId);
      const ph = Buffer.from(e.phase);
      const need = 2 + 12 + 4 + entry.length + 4 + 32 + 4 + rid.length + 4 + ph.length;
      if (o + need > chunk.length) {
        if (!stream.write(chunk.subarray(0, o))) await new Promise((r) => stream.once('drain', r));
        chunk = Buffer.allocUnsafe(4 << 20);
        o = 0;
      }
      o = chunk.writeInt16BE(5, o);
      o = chunk.writeInt32BE(8, o);
      o = chunk.writeInt32BE(Math.floor(i / 0x1_0000_0000), o);
      o = chunk.writeUInt32BE(i >>> 0, o);
      o = chunk.writeInt32BE(entry.length, o);
      o += entry.copy(chunk, o);
      o = chunk.writeInt32BE(32, o);
      o += leaf.copy(chunk, o);
      o = chunk.writeInt32BE(rid.length, o);
      o += rid.copy(chunk, o);
      o = chunk.writeInt32BE(ph.length, o);
      o += ph.copy(chunk, o);
      if (i > 0 && i % 1_000_000 === 0) {
        log(
          `  ${i.toLocaleString('en-US')} entries written (${Math.round(i / ((performance.now() - t0) / 1000))}/s)`,
        );
      }
    }
    stream.write(chunk.subarray(0, o));
    stream.end(Buffer.from([0xff, 0xff]));
    index.end(indexRows);
    await done;
    await indexDone;
    await ci.end();
    log('  rebuilding the request-id index, VACUUM ANALYZE');
    await c.query('CREATE INDEX audit_entry_request ON audit_entry (request_id)');
    await c.query('VACUUM (ANALYZE) audit_entry');
    // Without statistics the planner reads each batch's index rows with a parallel bitmap scan and sort.
    await c.query('VACUUM (ANALYZE) audit_index');
  } finally {
    await c.end();
  }
}

/** A driver that counts its queries (proof cost). */
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

async function bigLog(url: string) {
  const raw = await PgDriver.open(url, { max: 4 });
  const db = counting(raw);
  try {
    await prepareAuditSchema(raw, { production: false, log: silentLogger });
    const hasTiles = (await raw.query<{ ok: boolean }>(`SELECT to_regclass('audit_tile') IS NOT NULL AS ok`))
      .rows[0]!.ok;
    if (!hasTiles) for (const stmt of splitSql(TILE_MIGRATION_SQL)) await raw.query(stmt);
    const existing = Number(
      (await raw.query<{ n: number }>('SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_entry')).rows[0]!.n,
    );
    const seeding =
      existing >= cfg.entries
        ? { entries: existing, reused: true }
        : await phase(`seed: ${cfg.entries.toLocaleString('en-US')} entries with COPY`, async () => {
            if (existing > 0) throw new Error('the database given has a log already, smaller than --entries');
            const t = performance.now();
            await seed(url, cfg.entries);
            return { entries: cfg.entries, seconds: round((performance.now() - t) / 1000, 1) };
          });
    const audit = new AuditLog(db);
    // A kept log keeps its checkpoint key beside it (its signed checkpoints must verify next time).
    const keyDir = keepBig
      ? path.join(os.tmpdir(), `custos-audit-bench-key-${bigName}`)
      : fs.mkdtempSync(path.join(os.tmpdir(), 'custos-audit-bench-key-'));
    const cps = new Checkpoints({
      audit,
      keyFile: path.join(keyDir, 'audit-checkpoint.skey'),
      origin: 'bench.invalid/custos/audit',
    });
    try {
      const half = Math.floor(cfg.entries / 2);
      const firstCheckpoint = await phase(
        'first checkpoint: stores every tile of the seeded log (once)',
        async () => {
          const t = performance.now();
          const cp = await cps.checkpoint();
          return {
            treeSize: cp.treeSize,
            seconds: round((performance.now() - t) / 1000, 1),
            tiles: await cps.tiles.storedCounts(),
          };
        },
      );
      const t1 = performance.now();
      await cps.checkpoint();
      const againMs = round(performance.now() - t1, 1);
      // `custos audit verify` as it runs (query index included when the table exists), then without
      // the query index: entries, leaf hashes, tree, tiles and checkpoints only.
      const verifyRun = (index: boolean) => async () => {
        const t = performance.now();
        const r = await verifyAuditLog(audit, cps, { index });
        const seconds = (performance.now() - t) / 1000;
        if (!r.ok) throw new Error(`verify failed: ${JSON.stringify(r).slice(0, 300)}`);
        return {
          ok: r.ok,
          size: r.size,
          seconds: round(seconds, 2),
          entriesPerSecond: Math.round(r.size / seconds),
          tilesChecked: r.tiles.checked,
          checkpointsChecked: r.checkpoints?.checked,
          indexRowsChecked: r.index?.checkedRows,
          attemptsWithoutOutcome: r.attemptsWithoutOutcome.length,
          workers: Math.min(os.availableParallelism(), 8),
        };
      };
      const n = cfg.entries.toLocaleString('en-US');
      // --verify-runs N: both kinds N times, alternating, so that a change in the machine's other load
      // hits both alike. Each run also reports the CPU it took per entry (this process, and PostgreSQL).
      const runs: (Awaited<ReturnType<ReturnType<typeof verifyRun>>> & {
        index: boolean;
        cpu: ReturnType<typeof cpuDelta>;
        benchCpuUsPerEntry: number;
        postgresCpuUsPerEntry: number;
      })[] = [];
      for (let k = 1; k <= cfg.verifyRuns; k++) {
        for (const index of [true, false]) {
          const label = index ? 'verify' : 'verify without the query index';
          const r = await phase(`${label}: ${n} entries (run ${k})`, verifyRun(index));
          const perEntry = (cores: number) => round((cores * r.seconds * 1e6) / r.size, 2);
          runs.push({
            ...r,
            index,
            benchCpuUsPerEntry: perEntry(r.cpu.benchCores),
            postgresCpuUsPerEntry: perEntry(r.cpu.postgresCores),
          });
        }
      }
      const best = (index: boolean) =>
        runs.filter((r) => r.index === index).sort((a, b) => b.entriesPerSecond - a.entriesPerSecond)[0]!;
      const verify = best(true);
      const verifyWithoutIndex = best(false);
      const verifyRuns = runs.map((r) => ({
        index: r.index,
        entriesPerSecond: r.entriesPerSecond,
        seconds: r.seconds,
        benchCpuUsPerEntry: r.benchCpuUsPerEntry,
        postgresCpuUsPerEntry: r.postgresCpuUsPerEntry,
        otherCores: r.cpu.otherCores,
      }));
      const proofs = await phase(
        `proofs at ${cfg.entries.toLocaleString('en-US')} entries, ${cfg.proofs} of each`,
        async () => {
          const cp = await cps.checkpoint();
          const root = Buffer.from(cp.rootHash, 'hex');
          const inc: number[] = [];
          const incQueries: number[] = [];
          for (let k = 0; k < cfg.proofs; k++) {
            const seq = Math.floor(Math.random() * cp.treeSize);
            const q = db.queries;
            const t = performance.now();
            const p = (await cps.prove(seq))!;
            inc.push(performance.now() - t);
            incQueries.push(db.queries - q);
            const hex = (x: string) => Buffer.from(x, 'hex');
            if (!verifyInclusion(seq, p.treeSize, hex(p.leafHash), p.proof.map(hex), root))
              throw new Error('bad inclusion proof');
          }
          const con: number[] = [];
          const conQueries: number[] = [];
          for (let k = 0; k < cfg.proofs; k++) {
            const to = 1 + Math.floor(Math.random() * cp.treeSize);
            const from = 1 + Math.floor(Math.random() * to);
            const q = db.queries;
            const t = performance.now();
            const c = await cps.consistency(from, to);
            con.push(performance.now() - t);
            conQueries.push(db.queries - q);
            const hex = (x: string) => Buffer.from(x, 'hex');
            if (!verifyConsistency(from, to, c.proof.map(hex), hex(c.from.rootHash), hex(c.to.rootHash))) {
              throw new Error('bad consistency proof');
            }
          }
          const t = performance.now();
          await cps.consistency(half, cp.treeSize);
          return {
            treeSize: cp.treeSize,
            inclusionMs: latency(inc),
            inclusionQueries: latency(incQueries),
            consistencyMs: latency(con),
            consistencyQueries: latency(conQueries),
            consistencyHalfToFullMs: round(performance.now() - t, 3),
          };
        },
      );
      return {
        seeding,
        firstCheckpoint,
        checkpointUnchangedMs: againMs,
        verify,
        verifyWithoutIndex,
        verifyRuns,
        proofs,
      };
    } finally {
      if (!keepBig) fs.rmSync(keyDir, { recursive: true, force: true });
    }
  } finally {
    await raw.close();
  }
}

// ---- main --------------------------------------------------------------------------------------------

const name = `custos_auditbench_${randomBytes(4).toString('hex')}`;
const bigName = flags['big-database'] ?? `${name}_big`;
if (!/^[a-z_][a-z0-9_]*$/.test(bigName)) {
  process.stderr.write('audit-bench: --big-database must be a plain database name\n');
  process.exit(2);
}
const dbs = { res: `${name}_res`, audit: `${name}_audit` };
const started = new Date().toISOString();
const machine = {
  cores: os.cpus().length,
  cpu: os.cpus()[0]?.model,
  memoryGiB: round(os.totalmem() / 2 ** 30, 1),
  node: process.version,
  loadavgAtStart: os.loadavg().map((x) => round(x)),
};
log(`audit bench: databases ${name}_*, ${bigName}; ${JSON.stringify(machine)}`);
const onlyVerify = flags['only-verify'];
const keepBig = flags['keep-big'] || flags['big-database'] !== undefined;
try {
  if (!onlyVerify) for (const d of Object.values(dbs)) await adminQuery(`CREATE DATABASE ${d}`);
  if (!flags['big-database'] && !flags['skip-verify']) await adminQuery(`CREATE DATABASE ${bigName}`);
  const fsync = onlyVerify
    ? undefined
    : await phase('fsync: pg_test_fsync and a tiny committed INSERT', async () => ({
        pgTestFsync: pgTestFsync(),
        server: await committedInsert(withDatabase(baseUrl, dbs.audit)),
      }));
  const append = onlyVerify ? undefined : await appends(withDatabase(baseUrl, dbs.audit));
  const read = onlyVerify
    ? undefined
    : await readLatency(withDatabase(baseUrl, dbs.res), withDatabase(baseUrl, dbs.audit));
  // A failure here still leaves the measurements above in the JSON.
  const big = flags['skip-verify']
    ? { skipped: '--skip-verify' }
    : await bigLog(withDatabase(baseUrl, bigName)).catch((e: unknown) => {
        process.exitCode = 1;
        log(`verify phases failed: ${e instanceof Error ? e.message : String(e)}`);
        return { error: e instanceof Error ? e.message : String(e) };
      });
  const fsyncP50 = fsync?.server.walFlushP50Ms as number | undefined;
  process.stdout.write(
    `${JSON.stringify(
      {
        started,
        finished: new Date().toISOString(),
        command: `npm run -s bench:audit -- ${process.argv.slice(2).join(' ')}`.trim(),
        machine,
        config: cfg,
        fsync,
        appends: append,
        read: read && {
          ...read,
          targetAddedP50Ms: fsyncP50 === undefined ? undefined : round(fsyncP50 + 0.5, 3),
        },
        verify: big,
        ...(keepBig ? { keptDatabase: bigName } : {}),
      },
      null,
      2,
    )}\n`,
  );
} finally {
  const drop = [...(onlyVerify ? [] : Object.values(dbs)), ...(keepBig ? [] : [bigName])];
  for (const d of drop) await adminQuery(`DROP DATABASE IF EXISTS ${d} WITH (FORCE)`).catch(() => {});
  log(`databases dropped${keepBig ? ` (kept ${bigName})` : ''}`);
}
