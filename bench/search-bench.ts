/**
 * Custos search benchmark: `npm run bench:search` (= node --import tsx bench/search-bench.ts [flags]).
 *
 * For a PostgreSQL server (CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL; fresh databases
 * custos_bench_<hex> and <same>_audit, dropped at the end) and for the embedded store (PGlite):
 *
 *   1. start the real server as a child process (`src/cli/main.ts serve`, every control on:
 *      OAuth bearer token, purpose of use, scopes, audit group commit) and `init` it;
 *   2. import the Synthea transaction bundles through HTTP (HTEST added to every entry), which
 *      gives fully indexed rows (resource.search_keys and the search_string/date/number tables);
 *   3. clone those rows at the SQL level, straight into the resource database, under new ids
 *      (every UUID gets a `-k<n>` suffix) and new family names (`c<nnnn>` appended), until the
 *      resource table holds at least --resources rows. Clones bypass the gateway, so they are not
 *      audited; resource_version is not cloned (search and read use the resource table only);
 *   4. EXPLAIN (ANALYZE) the page query of each US Core search, built by src/store/search-sql.ts;
 *   5. measure over HTTP (bearer token, X-Purpose-Of-Use: TREAT, auditing on): reads by id as
 *      the baseline, each US Core search combination alone, then all of them mixed;
 *   6. measure the write cost of indexing: POST /fhir/R4/Observation (synthetic, HTEST) with the
 *      default server and with CUSTOS_SEARCH_INDEXING=off, alternating, on the same database.
 *
 * Prints ONE JSON document on stdout; progress goes to stderr. Client, server and PostgreSQL share
 * the machine's cores (see cpuCores per phase).
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { PGlite } from '@electric-sql/pglite';
import { freePort } from '../test/support/free-port.ts';
import { parseSearch } from '../src/fhir/search-request.ts';
import { runSearch } from '../src/store/search-sql.ts';
import type { SqlDriver, SqlQueryable } from '../src/store/sql-driver.ts';
import { dataPaths } from '../src/server.ts';
import { Envelope, type SealContext } from '../src/crypto/envelope.ts';
import { openLocalKeyring } from '../src/crypto/local-keyring.ts';
import { readOrCreateKeyFile } from '../src/kernel/key-file.ts';
import { HttpClient, prng, runLoad, type LoadResult, type Reply, type RequestSpec } from './load.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };

const { values: flags } = parseArgs({
  options: {
    resources: { type: 'string', default: '1000000' },
    'embedded-resources': { type: 'string', default: '100000' },
    duration: { type: 'string', default: '15' },
    'embedded-duration': { type: 'string' },
    concurrency: { type: 'string', default: '16' },
    warmup: { type: 'string', default: '5' },
    targets: { type: 'string', default: '32' },
    'write-duration': { type: 'string', default: '10' },
    'write-rounds': { type: 'string', default: '2' },
    'latency-duration': { type: 'string', default: '4' },
    'clone-parallel': { type: 'string', default: '2' },
    'clone-batch-rows': { type: 'string', default: '60000' },
    'import-parallel': { type: 'string', default: '3' },
    'quiet-wait': { type: 'string', default: '10' },
    synthea: { type: 'string', default: path.join(repoRoot, '..', 'shared', 'data', 'synthea-r4') },
    'skip-embedded': { type: 'boolean', default: false },
    'skip-postgres': { type: 'boolean', default: false },
    'skip-writes': { type: 'boolean', default: false },
    'cpu-prof-dir': { type: 'string' },
    'keep-db': { type: 'string' },
    searches: { type: 'string' },
    'skip-explain': { type: 'boolean', default: false },
    'statement-runs': { type: 'string', default: '3' },
    'mixed-only': { type: 'boolean', default: false },
    'pool-size': { type: 'string' },
    servers: { type: 'string', default: '1' },
    'drop-kept': { type: 'string' },
    help: { type: 'boolean', default: false },
  },
  allowPositionals: false,
});

if (flags.help) {
  process.stderr.write(`usage: npm run -s bench:search -- [--resources 1000000] [--embedded-resources 100000]
  [--duration 15] [--embedded-duration S] [--concurrency 16] [--latency-duration 4] [--warmup 5] [--targets 32]
  [--write-duration 10] [--write-rounds 2] [--clone-parallel 2] [--clone-batch-rows 60000]
  [--import-parallel 3] [--quiet-wait 10] [--synthea DIR] [--skip-embedded] [--skip-postgres] [--skip-writes]
  [--cpu-prof-dir DIR] (servers run under node --cpu-prof; phase windows are in the JSON)
  [--keep-db NAME] keep the seeded data set (database custos_bench_NAME[_audit], data directory
      <tmp>/custos-search-bench-NAME-<storage>) instead of dropping it; a later run with the same NAME
      and size reuses it (no import, no cloning). Remove with --drop-kept NAME.
  [--drop-kept NAME] drop what --keep-db NAME kept, and exit
  [--searches 'Encounter patient,Condition patient'] measure only these combinations (names as in the JSON)
  [--skip-explain] no EXPLAIN phase
  [--statement-runs 3] PostgreSQL: runs of the statement-cost phase (each search's page statement for
      every target, unprepared against prepared, PostgreSQL CPU per statement); 0 skips it
  [--mixed-only] of the search phases, only the read baseline and the mixed one (for A/B runs)
  [--pool-size N] the server's CUSTOS_DATABASE_POOL_SIZE (default: the server's own default)
  [--servers 1] PostgreSQL: search phases against N Custos processes on the same databases (each with a
      copy of the data directory's files and the first one's public URL), requests dealt round-robin
PostgreSQL runs when CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL is set.\n`);
  process.exit(0);
}

function int(name: string, v: string | undefined): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer`);
  return n;
}

const cfg = {
  resources: int('resources', flags.resources),
  embeddedResources: int('embedded-resources', flags['embedded-resources']),
  duration: Math.max(1, int('duration', flags.duration)),
  embeddedDuration: Math.max(1, int('embedded-duration', flags['embedded-duration'] ?? flags.duration)),
  concurrency: Math.max(1, int('concurrency', flags.concurrency)),
  latencyDuration: int('latency-duration', flags['latency-duration']),
  warmup: int('warmup', flags.warmup),
  targets: Math.max(1, int('targets', flags.targets)),
  writeDuration: Math.max(1, int('write-duration', flags['write-duration'])),
  writeRounds: Math.max(1, int('write-rounds', flags['write-rounds'])),
  cloneParallel: Math.max(1, int('clone-parallel', flags['clone-parallel'])),
  cloneBatchRows: Math.max(1000, int('clone-batch-rows', flags['clone-batch-rows'])),
  importParallel: Math.max(1, int('import-parallel', flags['import-parallel'])),
  quietWait: int('quiet-wait', flags['quiet-wait']),
  writes: !flags['skip-writes'],
  skipExplain: flags['skip-explain'],
  statementRuns: int('statement-runs', flags['statement-runs']),
  mixedOnly: flags['mixed-only'],
  servers: Math.max(1, int('servers', flags.servers)),
  poolSize: flags['pool-size'] === undefined ? undefined : Math.max(1, int('pool-size', flags['pool-size'])),
};
const pgAdminUrl = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL || undefined;
const keepName = flags['keep-db'] ?? flags['drop-kept'];
if (keepName !== undefined && !/^[a-z0-9_]{1,30}$/.test(keepName))
  throw new Error('--keep-db/--drop-kept NAME: lower-case letters, digits and _ only (at most 30)');

const log = (s: string) =>
  process.stderr.write(`[search-bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);
const round = (x: number, d = 1) => Math.round(x * 10 ** d) / 10 ** d;
const sec = (t0: number) => round((performance.now() - t0) / 1000, 1);

// ---- CPU accounting (Linux /proc), as in bench/http-bench.ts ----------------------------------

interface CpuSnap {
  at: number;
  machineBusy: number;
  machineTotal: number;
  server: number;
  client: number;
  postgres: Map<string, number>;
}
const TICK = 100; // USER_HZ

function procTicks(pid: number | readonly number[] | undefined): number {
  if (Array.isArray(pid)) return pid.reduce((sum: number, p: number) => sum + procTicks(p), 0);
  if (!pid) return 0;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

/** The bench database of the storage being measured (its backends are ours; other databases' are not). */
let benchDbName: string | undefined;
/** pid → whether that PostgreSQL process counts as ours (cached: a backend serves one database). */
const pgOwner = new Map<string, boolean>();

/**
 * CPU ticks of the PostgreSQL processes that work for this bench, by pid: backends of the bench
 * databases and the shared background processes (checkpointer, WAL writer, …). Backends of other
 * databases (other sessions on this machine) are left out, so `postgres` is not inflated by them.
 */
function postgresTicks(): Map<string, number> {
  const out = new Map<string, number>();
  let dirs: string[];
  try {
    dirs = fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  } catch {
    return out;
  }
  for (const d of dirs) {
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      if (stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) !== 'postgres') continue;
      let ours = pgOwner.get(d);
      if (ours === undefined) {
        const title = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ');
        const backend = /\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]/.test(title);
        ours = benchDbName !== undefined && title.includes(benchDbName) ? true : !backend;
        // A backend's title names its database from the start; cache only once it says so.
        if (!backend || / (idle|SELECT|INSERT|UPDATE|DELETE|COMMIT|BEGIN|SET)/.test(title))
          pgOwner.set(d, ours);
      }
      if (!ours) continue;
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(d, Number(f[11]) + Number(f[12]));
    } catch {
      /* exited */
    }
  }
  return out;
}

/** Ticks used between two snapshots by the PostgreSQL processes alive at the end (exited ones are lost, never negative). */
function postgresDelta(a: Map<string, number>, b: Map<string, number>): number {
  let sum = 0;
  for (const [pid, t] of b) sum += Math.max(0, t - (a.get(pid) ?? 0));
  return sum;
}

function cpuSnap(serverPid: number | readonly number[] | undefined): CpuSnap {
  let machineBusy = 0;
  let machineTotal = 0;
  try {
    const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    machineTotal = v.slice(0, 8).reduce((a, b) => a + b, 0);
    machineBusy = machineTotal - (v[3] ?? 0) - (v[4] ?? 0);
  } catch {
    /* not Linux */
  }
  const u = process.cpuUsage();
  return {
    at: performance.now(),
    machineBusy,
    machineTotal,
    server: procTicks(serverPid),
    client: ((u.user + u.system) / 1e6) * TICK,
    postgres: postgresTicks(),
  };
}

/** Average cores used in the interval: machine, server child, this client, PostgreSQL, and the rest. */
function cpuDelta(a: CpuSnap, b: CpuSnap) {
  const seconds = (b.at - a.at) / 1000;
  const cores = (ticks: number) => round(ticks / TICK / seconds, 2);
  const machineCores = os.cpus().length;
  const busyShare =
    b.machineTotal > a.machineTotal ? (b.machineBusy - a.machineBusy) / (b.machineTotal - a.machineTotal) : 0;
  const busy = round(busyShare * machineCores, 2);
  const server = cores(b.server - a.server);
  const client = cores(b.client - a.client);
  const postgres = cores(postgresDelta(a.postgres, b.postgres));
  return { busy, server, client, postgres, other: Math.max(0, round(busy - server - client - postgres, 2)) };
}

function perRequest(a: CpuSnap, b: CpuSnap, requests: number) {
  const ms = (ticks: number) => (requests > 0 ? round(((ticks / TICK) * 1000) / requests, 3) : null);
  return {
    server: ms(b.server - a.server),
    postgres: ms(postgresDelta(a.postgres, b.postgres)),
    client: ms(b.client - a.client),
  };
}

/** Waits up to --quiet-wait seconds for foreign load (other sessions' tests) to drop below 0.25 cores. */
async function waitForQuiet(serverPid: number | readonly number[] | undefined): Promise<number> {
  const deadline = performance.now() + cfg.quietWait * 1000;
  for (;;) {
    const a = cpuSnap(serverPid);
    await new Promise((r) => setTimeout(r, 1000));
    const d = cpuDelta(a, cpuSnap(serverPid));
    const foreign = round(d.busy - d.client, 2);
    if (foreign <= 0.25 || performance.now() > deadline) {
      if (foreign > 0.25) log(`  machine still busy (${foreign} cores used by others); measuring anyway`);
      return foreign;
    }
    log(`  waiting for the machine to be quiet (${foreign} cores used by others)…`);
  }
}

// ---- child processes (as in bench/http-bench.ts) ----------------------------------------------

function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('CUSTOS_')) env[k] = v;
  return { ...env, ...extra };
}

interface Child {
  proc: ChildProcess;
  url: string;
  stop(): Promise<void>;
}

function waitExit(proc: ChildProcess, ms: number): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      resolve();
    }, ms);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function startCustos(env: NodeJS.ProcessEnv, logFile: string): Promise<Child> {
  return new Promise((resolve, reject) => {
    const logFd = fs.openSync(logFile, 'a');
    const prof = flags['cpu-prof-dir'] ? ['--cpu-prof', '--cpu-prof-dir', flags['cpu-prof-dir']] : [];
    const proc = spawn(process.execPath, [...prof, '--import', 'tsx', 'src/cli/main.ts', 'serve'], {
      cwd: repoRoot,
      env,
      stdio: ['ignore', logFd, 'pipe'],
    });
    let err = '';
    let done = false;
    proc.stderr!.on('data', (c: Buffer) => {
      fs.writeSync(logFd, c);
      if (done) return;
      err += c.toString();
      const url = /listening on (\S+?)\)/.exec(err)?.[1];
      if (url) {
        done = true;
        clearTimeout(timer);
        resolve({
          proc,
          url,
          async stop() {
            proc.kill('SIGTERM');
            await waitExit(proc, 30_000);
            fs.closeSync(logFd);
          },
        });
      }
    });
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      proc.kill('SIGKILL');
      reject(new Error(`server did not start in 120 s: ${err.slice(-2000)}`));
    }, 120_000);
    proc.once('exit', (code) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before it was ready: ${err.slice(-2000)}`));
    });
  });
}

async function custosInit(env: NodeJS.ProcessEnv) {
  const { stdout } = await promisify(execFile)(
    process.execPath,
    ['--import', 'tsx', 'src/cli/main.ts', 'init', '--json'],
    { cwd: repoRoot, env },
  );
  const r = JSON.parse(stdout) as { projectId: string; clientId: string; clientSecret?: string };
  if (!r.clientSecret) throw new Error('custos init returned no client secret (data directory not fresh?)');
  return { projectId: r.projectId, clientId: r.clientId, clientSecret: r.clientSecret };
}

type Creds = Awaited<ReturnType<typeof custosInit>>;

async function tokenKeeper(client: HttpClient, creds: Creds) {
  const fetchToken = async () => {
    const r = await client.send({
      method: 'POST',
      path: '/oauth/token',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope: 'system/*.cruds',
        client_id: creds.clientId,
        client_secret: creds.clientSecret,
      }).toString(),
    });
    const json = JSON.parse(r.body.toString()) as { access_token?: string };
    if (!json.access_token) throw new Error(`token request failed: ${r.status}`);
    return json.access_token;
  };
  const holder = { value: await fetchToken() };
  const timer = setInterval(() => {
    fetchToken().then(
      (t) => (holder.value = t),
      (e: unknown) => log(`token refresh failed: ${String(e)}`),
    );
  }, 120_000);
  timer.unref();
  return { holder, stop: () => clearInterval(timer) };
}

/** A running server with its client and token. */
interface Session {
  child: Child;
  /** With --servers N > 1: the other processes, which `client` deals requests to in turn. */
  extra?: Child[];
  client: Pick<HttpClient, 'send' | 'close'>;
  token: { value: string };
  stop(): Promise<void>;
}

/** The server processes of a session (for their CPU). */
function serverPids(s: Session): number[] {
  return [s.child, ...(s.extra ?? [])].map((c) => c.proc.pid!).filter(Boolean);
}

/** Requests dealt to several clients in turn (one per server process). */
class RoundRobinClient {
  private next = 0;
  constructor(private readonly clients: HttpClient[]) {}
  send(spec: RequestSpec): Promise<Reply> {
    return this.clients[this.next++ % this.clients.length]!.send(spec);
  }
  close(): void {
    for (const c of this.clients) c.close();
  }
}

/**
 * Starts `n - 1` more servers beside `s` on the same databases: each gets a copy of the data
 * directory's files (keys, admin token; a data directory is one process's) and the first server's
 * public URL, so that the tokens the first issues are valid on all. The session's client then deals
 * requests to them in turn; `stop()` stops them too.
 */
async function addServers(s: Session, n: number, env: NodeJS.ProcessEnv, dataDir: string): Promise<Session> {
  if (n <= 1) return s;
  const extra: Child[] = [];
  const clients = [s.client as HttpClient];
  // The copies hold key files: removed when the servers stop, kept data set or not.
  const dirs: string[] = [];
  const removeCopies = () => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true }));
  try {
    for (let i = 1; i < n; i++) {
      const dir = `${dataDir}-server${i}`;
      fs.rmSync(dir, { recursive: true, force: true });
      dirs.push(dir);
      fs.cpSync(dataDir, dir, {
        recursive: true,
        filter: (src) => !/(server\.json|\.log|[/\\]profile)$/.test(src),
      });
      const child = await startCustos(
        {
          ...env,
          CUSTOS_DATA_DIR: dir,
          CUSTOS_PORT: String(await freePort()),
          CUSTOS_PUBLIC_URL: s.child.url,
        },
        path.join(dir, 'server.log'),
      );
      extra.push(child);
      clients.push(new HttpClient(child.url, cfg.concurrency + 2));
    }
  } catch (e) {
    for (const c of extra) await c.stop();
    removeCopies();
    throw e;
  }
  const stopFirst = s.stop.bind(s);
  return {
    ...s,
    extra,
    client: new RoundRobinClient(clients),
    async stop() {
      for (const c of clients.slice(1)) c.close();
      for (const c of extra) await c.stop();
      removeCopies();
      await stopFirst();
    },
  };
}

async function openSession(env: NodeJS.ProcessEnv, logFile: string, creds?: Creds) {
  const child = await startCustos(env, logFile);
  try {
    const c = creds ?? (await custosInit(env));
    const client = new HttpClient(child.url, Math.max(cfg.concurrency, cfg.importParallel) + 2);
    const tk = await tokenKeeper(client, c);
    const session: Session = {
      child,
      client,
      token: tk.holder,
      async stop() {
        tk.stop();
        client.close();
        await child.stop();
      },
    };
    return { session, creds: c };
  } catch (e) {
    await child.stop();
    throw e;
  }
}

function fhirHeaders(token: { value: string }, body: boolean): Record<string, string> {
  const h: Record<string, string> = {
    authorization: `Bearer ${token.value}`,
    'x-purpose-of-use': 'TREAT',
    accept: 'application/fhir+json',
  };
  if (body) h['content-type'] = 'application/fhir+json';
  return h;
}

// ---- Synthea import ---------------------------------------------------------------------------

interface PreparedBundle {
  file: string;
  body: Buffer;
  entries: number;
}

function prepareSynthea(dir: string): PreparedBundle[] {
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((file) => {
      const bundle = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')) as {
        entry?: { resource?: { meta?: { security?: unknown[] } } }[];
      };
      for (const e of bundle.entry ?? []) {
        if (!e.resource) continue;
        const meta = (e.resource.meta ??= {});
        const security = (meta.security ??= []);
        if (!security.some((c) => (c as { code?: string }).code === HTEST.code)) security.push(HTEST);
      }
      return { file, body: Buffer.from(JSON.stringify(bundle)), entries: bundle.entry?.length ?? 0 };
    });
}

async function importSynthea(s: Session, bundles: PreparedBundle[]) {
  const failures: { file: string; status: number; body?: string }[] = [];
  let next = 0;
  let resources = 0;
  const t0 = performance.now();
  const worker = async () => {
    while (next < bundles.length) {
      const b = bundles[next++]!;
      const r = await s.client.send({
        method: 'POST',
        path: '/fhir/R4',
        headers: fhirHeaders(s.token, true),
        body: b.body,
      });
      if (r.status === 200) resources += b.entries;
      else failures.push({ file: b.file, status: r.status, body: r.body.toString().slice(0, 300) });
    }
  };
  await Promise.all(Array.from({ length: Math.min(cfg.importParallel, bundles.length) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  if (failures.length > 0) throw new Error(`Synthea import failed: ${JSON.stringify(failures.slice(0, 3))}`);
  return {
    bundles: bundles.length,
    resources,
    seconds: round(seconds, 1),
    resourcesPerSecond: round(resources / seconds),
    labelled: 'meta.security HTEST added to every entry (sandbox projects refuse unlabelled data)',
  };
}

// ---- direct database access (cloning, targets, EXPLAIN) ----------------------------------------

interface Db {
  query<R = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<R[]>;
  close(): Promise<void>;
}

async function openPg(url: string): Promise<Db> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  c.on('error', () => {});
  return {
    query: async <R>(sql: string, params?: unknown[]) => (await c.query(sql, params)).rows as R[],
    close: () => c.end(),
  };
}

async function openPglite(dir: string): Promise<Db> {
  const db = new PGlite(dir);
  await db.waitReady;
  return {
    query: async <R>(sql: string, params?: unknown[]) =>
      params === undefined
        ? (((await db.exec(sql)).at(-1)?.rows ?? []) as R[])
        : (await db.query<R>(sql, params)).rows,
    close: () => db.close(),
  };
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.href;
}

async function adminQuery(sql: string): Promise<pg.QueryResult> {
  const c = new pg.Client({ connectionString: pgAdminUrl });
  await c.connect();
  try {
    return await c.query(sql);
  } finally {
    await c.end();
  }
}

const INDEXED_TABLES = ['resource', 'search_string', 'search_date', 'search_number'] as const;
const UUID_RE = '([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})';
/** Clone k: every UUID gets `-k<k>` (clone 0 keeps its ids), every Patient family name gets `c<kkkk>`. */
const CLONES = `(SELECT k, CASE WHEN k = 0 THEN '' ELSE '-k' || k END AS sfx, 'c' || lpad(k::text, 4, '0') AS fam
                 FROM unnest($2::int[]) AS k) c`;
const re = (x: string) => `regexp_replace(${x}, $1, '\\1' || c.sfx, 'g')`;
/** How a column of an indexed table is rewritten for copy k; any other column is copied as is. */
const CLONE_EXPR: Record<string, string> = {
  id: re('s.id'),
  content: `CASE WHEN s.content IS NULL THEN NULL
      WHEN s.resource_type = 'Patient'
        THEN regexp_replace(${re('s.content::text')}, '("family": "[^"]*)"', '\\1' || c.fam || '"', 'g')::jsonb
      ELSE ${re('s.content::text')}::jsonb END`,
  patients: `${re('s.patients::text')}::text[]`,
  search_keys: `${re('s.search_keys::text')}::text[]`,
  'search_string.norm': `CASE WHEN s.fam THEN s.norm || c.fam ELSE ${re('s.norm')} END`,
  'search_string.exact': `CASE WHEN s.fam THEN s.exact || c.fam ELSE ${re('s.exact')} END`,
  comp: `CASE WHEN s.comp IS NULL THEN NULL ELSE ${re('s.comp')} END`,
  // Sealed elements are bound to their record's id: copies get theirs from bench_sealed (see reseal).
  'resource.sealed': `CASE WHEN s.sealed IS NULL OR c.k = 0 THEN s.sealed ELSE
      (SELECT b.sealed FROM bench_sealed b WHERE b.k = c.k AND b.resource_type = s.resource_type AND b.id = s.id) END`,
};

/**
 * Re-seals the sealed elements (encryption, src/crypto/envelope.ts) of the imported rows for every
 * copy: the associated data binds project, type, id and version, so a copied ciphertext would not
 * open under the copy's id. Opens each with the project's data key (read from the data directory's
 * development keyring, as the server does; these unwraps are not audited) and seals it again for
 * each copy's id, with the copy's UUID rewrite applied to the plaintext. Writes bench_sealed.
 */
async function reseal(db: Db, kind: 'postgres' | 'embedded', dataDir: string, copies: number) {
  const rows = await db.query<{
    project_id: string;
    resource_type: string;
    id: string;
    version_id: number;
    sealed: Record<string, string> | string;
  }>(
    'SELECT project_id, resource_type, id, version_id, sealed FROM bench_src_resource WHERE sealed IS NOT NULL',
  );
  await db.query(
    'DROP TABLE IF EXISTS bench_sealed; CREATE UNLOGGED TABLE bench_sealed (k integer, resource_type text, id text, sealed jsonb)',
  );
  if (rows.length === 0 || copies < 2) return { sealedRowsPerCopy: rows.length, byType: {} };
  const paths = dataPaths(dataDir);
  const passphrase = readOrCreateKeyFile(paths.devKeyringPassphrase, () => {
    throw new Error('sealed rows but no development keyring passphrase in the data directory');
  });
  const provider = await openLocalKeyring(paths.keyring, passphrase, {});
  const q: SqlQueryable = {
    query: async <R>(sql: string, p?: readonly unknown[]) => ({
      rows: await db.query<R>(sql, p ? [...p] : undefined),
    }),
  };
  const driver = {
    kind,
    ...q,
    transaction: <T>(fn: (tx: SqlQueryable) => Promise<T>) => fn(q),
    lockedTransaction: <T>(_k: string, fn: (tx: SqlQueryable) => Promise<T>) => fn(q),
  } as unknown as SqlDriver;
  const envelope = new Envelope({ db: driver, provider, onUnwrap: async () => {} });
  const byType: Record<string, number> = {};
  const uuid = new RegExp(UUID_RE, 'g');
  const opened: {
    type: string;
    id: string;
    version: number;
    projectId: string;
    classes: [string, string][];
  }[] = [];
  for (const r of rows) {
    byType[r.resource_type] = (byType[r.resource_type] ?? 0) + 1;
    const sealed = typeof r.sealed === 'string' ? (JSON.parse(r.sealed) as Record<string, string>) : r.sealed;
    const classes: [string, string][] = [];
    for (const [cls, blob] of Object.entries(sealed)) {
      const ctx: SealContext = {
        projectId: r.project_id,
        type: r.resource_type,
        id: r.id,
        version: Number(r.version_id),
        cls: cls as SealContext['cls'],
      };
      classes.push([cls, (await envelope.open(ctx, blob)).toString('utf8')]);
    }
    opened.push({
      type: r.resource_type,
      id: r.id,
      version: Number(r.version_id),
      projectId: r.project_id,
      classes,
    });
  }
  const { epoch, dek } = await envelope.prepareWrite(rows[0]!.project_id);
  for (let k = 1; k < copies; k++) {
    const ks: number[] = [];
    const types: string[] = [];
    const ids: string[] = [];
    const blobs: string[] = [];
    for (const o of opened) {
      const id = o.id.replace(uuid, `$1-k${k}`);
      const out: Record<string, string> = {};
      for (const [cls, plain] of o.classes)
        out[cls] = Envelope.seal(
          dek,
          epoch,
          { projectId: o.projectId, type: o.type, id, version: o.version, cls: cls as SealContext['cls'] },
          Buffer.from(plain.replace(uuid, `$1-k${k}`)),
        );
      ks.push(k);
      types.push(o.type);
      ids.push(o.id);
      blobs.push(JSON.stringify(out));
    }
    await db.query(
      'INSERT INTO bench_sealed SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::jsonb[])',
      [ks, types, ids, blobs],
    );
  }
  await db.query('CREATE INDEX ON bench_sealed (k, resource_type, id)');
  envelope.clearCache();
  return { sealedRowsPerCopy: rows.length, byType };
}

/** INSERT…SELECT of copies $2 of `table` from its snapshot, for the table's columns as they are now. */
async function cloneSql(db: Db, table: (typeof INDEXED_TABLES)[number]): Promise<string> {
  const cols = (
    await db.query<{ column_name: string }>(
      `SELECT column_name FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position`,
      [table],
    )
  ).map((r) => r.column_name);
  const expr = (c: string) => CLONE_EXPR[`${table}.${c}`] ?? CLONE_EXPR[c] ?? `s.${c}`;
  // (the expressions refer to c.k, c.sfx and c.fam of the copy, s.* of the snapshot row)
  return `INSERT INTO ${table} (${cols.join(', ')})
    SELECT ${cols.map(expr).join(',\n      ')}
    FROM bench_src_${table.replace('search_', '')} s CROSS JOIN ${CLONES}`;
}

/** Runs `jobs` on `dbs` (one job at a time per connection). */
async function parallel<T>(dbs: Db[], jobs: T[], run: (db: Db, job: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    dbs.map(async (db) => {
      while (next < jobs.length) await run(db, jobs[next++]!);
    }),
  );
}

/**
 * Grows the imported data to at least `target` resource rows by cloning at the SQL level.
 * The imported rows become clone 0 (same ids; family names get `c0000` like every clone).
 */
async function buildDataSet(dbs: Db[], kind: 'postgres' | 'embedded', target: number, dataDir: string) {
  const db = dbs[0]!;
  const t0 = performance.now();
  const timings: Record<string, number> = {};
  const source = Number((await db.query<{ n: string }>('SELECT count(*) AS n FROM resource'))[0]!.n);
  const clones = Math.max(1, Math.ceil(target / source));
  log(`  ${source} imported resources; ${clones} copies (clone 0 = the imported rows) for ≥ ${target} rows`);

  // Eligible patients: those with every resource type the searches need (computed on the source).
  const perPatient = await db.query<{ pid: string; resource_type: string; n: string }>(
    `SELECT p AS pid, resource_type, count(*) AS n FROM resource, unnest(patients) p GROUP BY 1, 2`,
  );
  const byPatient = new Map<string, Set<string>>();
  for (const r of perPatient) {
    if (!byPatient.has(r.pid)) byPatient.set(r.pid, new Set());
    byPatient.get(r.pid)!.add(r.resource_type);
  }
  const needed = ['Observation', 'Condition', 'Encounter', 'MedicationRequest', 'DiagnosticReport'];
  const eligible = [...byPatient.entries()]
    .filter(([, types]) => types.has('Patient') && needed.every((t) => types.has(t)))
    .map(([pid]) => pid)
    .sort();

  let t = performance.now();
  await db.query(`
    DROP TABLE IF EXISTS bench_src_resource, bench_src_family, bench_src_string, bench_src_date, bench_src_number;
    CREATE UNLOGGED TABLE bench_src_resource AS SELECT * FROM resource;
    CREATE UNLOGGED TABLE bench_src_family AS
      SELECT r.id, n->>'family' AS family FROM resource r,
        jsonb_array_elements(CASE WHEN jsonb_typeof(r.content->'name') = 'array' THEN r.content->'name' ELSE '[]'::jsonb END) n
      WHERE r.resource_type = 'Patient' AND n ? 'family';
    CREATE UNLOGGED TABLE bench_src_string AS
      SELECT s.*, (s.resource_type = 'Patient' AND s.code IN ('name', 'family', 'phonetic')
                   AND EXISTS (SELECT 1 FROM bench_src_family f WHERE f.id = s.id AND f.family = s.exact)) AS fam
      FROM search_string s;
    CREATE UNLOGGED TABLE bench_src_date AS SELECT * FROM search_date;
    CREATE UNLOGGED TABLE bench_src_number AS SELECT * FROM search_number;`);
  const sourceRows: Record<string, number> = {};
  for (const tb of INDEXED_TABLES)
    sourceRows[tb] = Number(
      (await db.query<{ n: string }>(`SELECT count(*) AS n FROM bench_src_${tb.replace('search_', '')}`))[0]!
        .n,
    );
  const familyRows = Number(
    (await db.query<{ n: string }>('SELECT count(*) AS n FROM bench_src_string WHERE fam'))[0]!.n,
  );
  // Secondary indexes are dropped during the bulk load and rebuilt after it (primary keys stay).
  const indexes = await db.query<{ indexname: string; indexdef: string; tablename: string }>(
    `SELECT indexname, indexdef, tablename FROM pg_indexes
      WHERE schemaname = current_schema() AND tablename = ANY($1::text[]) AND indexname NOT LIKE '%\\_pkey'`,
    [[...INDEXED_TABLES]],
  );
  for (const ix of indexes) await db.query(`DROP INDEX ${ix.indexname}`);
  await db.query(`TRUNCATE ${INDEXED_TABLES.join(', ')}`);
  timings.snapshotSeconds = sec(t);

  t = performance.now();
  const hasSealed =
    (
      await db.query(
        `SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'resource' AND column_name = 'sealed'`,
      )
    ).length > 0;
  const sealing = hasSealed ? await reseal(db, kind, dataDir, clones) : { note: 'no sealed column' };
  timings.resealSeconds = sec(t);

  t = performance.now();
  const perBatch = Math.max(1, Math.floor(cfg.cloneBatchRows / source));
  const batches: number[][] = [];
  for (let k = 0; k < clones; k += perBatch)
    batches.push(Array.from({ length: Math.min(perBatch, clones - k) }, (_, i) => k + i));
  let doneRows = 0;
  const sqls = await Promise.all(INDEXED_TABLES.map((tb) => cloneSql(db, tb)));
  await parallel(dbs, batches, async (conn, ks) => {
    for (const sql of sqls) await conn.query(sql, [UUID_RE, ks]);
    doneRows += ks.length * source;
    const s = (performance.now() - t) / 1000;
    log(
      `  cloned ${doneRows}/${clones * source} resource rows (clones ${ks[0]}–${ks.at(-1)}), ${round(doneRows / s, 0)} rows/s`,
    );
  });
  timings.cloneSeconds = sec(t);
  await db.query(
    'DROP TABLE IF EXISTS bench_src_resource, bench_src_family, bench_src_string, bench_src_date, bench_src_number, bench_sealed',
  );

  t = performance.now();
  // Biggest first (the GIN index on search_keys), so the parallel builds finish together.
  const order = [...indexes].sort(
    (a, b) => Number(b.indexdef.includes('gin')) - Number(a.indexdef.includes('gin')),
  );
  const mem = kind === 'postgres' ? '1GB' : '256MB';
  for (const conn of dbs) await conn.query(`SET maintenance_work_mem = '${mem}'`);
  await parallel(dbs, order, async (conn, ix) => {
    const t1 = performance.now();
    await conn.query(ix.indexdef);
    log(`  index ${ix.indexname} built in ${sec(t1)} s`);
  });
  timings.indexSeconds = sec(t);
  t = performance.now();
  await parallel(dbs, [...INDEXED_TABLES], async (conn, tb) => {
    await conn.query(`VACUUM ANALYZE ${tb}`);
  });
  timings.vacuumAnalyzeSeconds = sec(t);
  timings.totalSeconds = sec(t0);

  let sealedRows: number | string;
  try {
    sealedRows = Number(
      (await db.query<{ n: string }>('SELECT count(*) AS n FROM resource WHERE sealed IS NOT NULL'))[0]!.n,
    );
  } catch {
    sealedRows = 'no sealed column';
  }
  const byType = await db.query<{ resource_type: string; n: string }>(
    'SELECT resource_type, count(*) AS n FROM resource GROUP BY 1 ORDER BY 2 DESC',
  );
  const rows: Record<string, number> = {};
  for (const tb of [...INDEXED_TABLES, 'resource_version'])
    rows[tb] = Number((await db.query<{ n: string }>(`SELECT count(*) AS n FROM ${tb}`))[0]!.n);
  const sizes: Record<string, number> = {};
  for (const tb of [...INDEXED_TABLES, 'resource_version'])
    sizes[tb] = round(
      Number((await db.query<{ b: string }>(`SELECT pg_total_relation_size('${tb}') AS b`))[0]!.b) / 2 ** 20,
      0,
    );
  log(
    `  data set: ${rows.resource} resources in ${timings.totalSeconds} s (clone ${timings.cloneSeconds} s, indexes ${timings.indexSeconds} s, vacuum ${timings.vacuumAnalyzeSeconds} s)`,
  );
  return {
    result: {
      resources: rows.resource,
      importedResources: source,
      copies: clones,
      rows,
      sourceRows,
      patientFamilyIndexRowsPerCopy: familyRows,
      sealedRows,
      sealing,
      byType: Object.fromEntries(byType.map((r) => [r.resource_type, Number(r.n)])),
      tableSizesMB: sizes,
      buildSeconds: timings,
      clonedBy: `SQL INSERT…SELECT straight into the resource database (${dbs.length} connection${dbs.length > 1 ? 's' : ''}, batches of ${perBatch} cop${perBatch > 1 ? 'ies' : 'y'}); secondary indexes dropped during the load and rebuilt after it, then VACUUM ANALYZE`,
      cloneRule:
        "copy k: every UUID in id, content, patients, search_keys and the side tables gets '-k<k>' (copy 0 keeps the imported ids); Patient family names get 'c<kkkk>' appended in content and in the search_string rows of name/family/phonetic (norm and exact)",
      notAudited:
        'clones bypass the PHI gateway (no audit entries, no Provenance of their own); only the HTTP import is audited',
      resourceVersion:
        'not cloned: resource_version holds only the imported versions (search and read use the resource table; _history of a clone is empty)',
    },
    eligible,
    clones,
  };
}

// ---- targets and searches ---------------------------------------------------------------------

interface Target {
  pid: string;
  copy: number;
  identifier: string;
  family: string;
  birthDate: string;
  gender: string;
  obsCategory: string;
  obsCode: string;
  obsDate: string;
  medIntent: string;
  medStatus: string;
  drCategory: string;
}

type Json = Record<string, unknown>;
const coding = (cc: unknown): { system?: string; code?: string } | undefined => {
  const list = Array.isArray(cc) ? cc : [cc];
  for (const c of list) {
    const first = ((c as Json | undefined)?.coding as Json[] | undefined)?.[0];
    if (first?.code) return first as { system?: string; code?: string };
  }
  return undefined;
};
const token = (c: { system?: string; code?: string }) => (c.system ? `${c.system}|${c.code}` : c.code!);

async function pickTargets(db: Db, projectId: string, eligible: string[], clones: number): Promise<Target[]> {
  if (eligible.length === 0) throw new Error('no imported patient has every resource type the searches need');
  const out: Target[] = [];
  const rows = async (type: string, pid: string) =>
    (
      await db.query<{ content: Json | string }>(
        `SELECT content FROM resource WHERE project_id = $1 AND resource_type = $2 AND patients @> ARRAY[$3]::text[] AND NOT deleted ORDER BY id`,
        [projectId, type, pid],
      )
    ).map((r) => (typeof r.content === 'string' ? (JSON.parse(r.content) as Json) : r.content));
  for (let t = 0; t < cfg.targets; t++) {
    const orig = eligible[(t * 7) % eligible.length]!;
    const copy = cfg.targets === 1 ? clones - 1 : Math.round((t * (clones - 1)) / (cfg.targets - 1));
    const pid = copy === 0 ? orig : `${orig}-k${copy}`;
    const [patient] = (await rows('Patient', pid)).filter((p) => p.id === pid);
    if (!patient) throw new Error(`target patient ${pid} not found after cloning`);
    const idents = (patient.identifier as Json[] | undefined) ?? [];
    const ident =
      idents.find((i) => i.system === 'https://github.com/synthetichealth/synthea') ??
      idents.find((i) => /[0-9a-f]{8}-/.test(String(i.value)));
    const names = (patient.name as Json[] | undefined) ?? [];
    const family = String(names.find((n) => n.use === 'official')?.family ?? names[0]?.family ?? '');
    const obs = (await rows('Observation', pid)).filter(
      (o) => coding(o.category) && coding(o.code) && typeof o.effectiveDateTime === 'string',
    );
    const lab = obs.filter((o) => coding(o.category)!.code === 'laboratory');
    const pool = lab.length > 0 ? lab : obs;
    const o = pool[Math.floor(pool.length / 2)];
    const med = (await rows('MedicationRequest', pid))[0];
    const dr = (await rows('DiagnosticReport', pid)).find((d) => coding(d.category));
    if (!ident || !family || !o || !med || !dr || !patient.birthDate || !patient.gender)
      throw new Error(`target patient ${pid} lacks a value the searches need`);
    out.push({
      pid,
      copy,
      identifier: `${String(ident.system)}|${String(ident.value)}`,
      family,
      birthDate: String(patient.birthDate),
      gender: String(patient.gender),
      obsCategory: token(coding(o.category)!),
      obsCode: token(coding(o.code)!),
      obsDate: `ge${String(o.effectiveDateTime).slice(0, 10)}`,
      medIntent: String(med.intent),
      medStatus: String(med.status),
      drCategory: token(coding(dr.category)!),
    });
  }
  return out;
}

/** The US Core search combinations: [name, type, parameters of a target]. */
const ALL_SEARCHES: [string, string, (t: Target) => [string, string][]][] = [
  ['Patient identifier', 'Patient', (t) => [['identifier', t.identifier]]],
  ['Patient name', 'Patient', (t) => [['name', t.family]]],
  [
    'Patient birthdate+name',
    'Patient',
    (t) => [
      ['birthdate', t.birthDate],
      ['name', t.family],
    ],
  ],
  [
    'Patient gender+name',
    'Patient',
    (t) => [
      ['gender', t.gender],
      ['name', t.family],
    ],
  ],
  [
    'Observation patient+category',
    'Observation',
    (t) => [
      ['patient', t.pid],
      ['category', t.obsCategory],
    ],
  ],
  [
    'Observation patient+category+date',
    'Observation',
    (t) => [
      ['patient', t.pid],
      ['category', t.obsCategory],
      ['date', t.obsDate],
    ],
  ],
  [
    'Observation patient+code',
    'Observation',
    (t) => [
      ['patient', t.pid],
      ['code', t.obsCode],
    ],
  ],
  [
    'Observation patient+code+date',
    'Observation',
    (t) => [
      ['patient', t.pid],
      ['code', t.obsCode],
      ['date', t.obsDate],
    ],
  ],
  ['Condition patient', 'Condition', (t) => [['patient', t.pid]]],
  ['Encounter patient', 'Encounter', (t) => [['patient', t.pid]]],
  [
    'MedicationRequest patient+intent',
    'MedicationRequest',
    (t) => [
      ['patient', t.pid],
      ['intent', t.medIntent],
    ],
  ],
  [
    'MedicationRequest patient+intent+status',
    'MedicationRequest',
    (t) => [
      ['patient', t.pid],
      ['intent', t.medIntent],
      ['status', t.medStatus],
    ],
  ],
  ['DiagnosticReport patient', 'DiagnosticReport', (t) => [['patient', t.pid]]],
  [
    'DiagnosticReport patient+category',
    'DiagnosticReport',
    (t) => [
      ['patient', t.pid],
      ['category', t.drCategory],
    ],
  ],
];

const only = flags.searches?.split(',').map((x) => x.trim());
for (const n of only ?? [])
  if (!ALL_SEARCHES.some(([name]) => name === n)) throw new Error(`--searches: no search named '${n}'`);
const SEARCHES = only ? ALL_SEARCHES.filter(([name]) => only.includes(name)) : ALL_SEARCHES;

const searchPath = (type: string, params: [string, string][]) =>
  `/fhir/R4/${type}?${params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join('&')}`;

/** Checks that every search of every target answers 200 with a searchset holding ≥ 1 match. */
async function verifySearches(s: Session, targets: Target[]) {
  const out: Record<string, { requests: number; matches: { min: number; median: number; max: number } }> = {};
  for (const [name, type, params] of SEARCHES) {
    const counts: number[] = [];
    for (const t of targets) {
      const p = searchPath(type, params(t));
      const r = await s.client.send({ method: 'GET', path: p, headers: fhirHeaders(s.token, false) });
      const body = JSON.parse(r.body.toString()) as {
        resourceType?: string;
        type?: string;
        entry?: { resource?: { id?: string }; search?: { mode?: string } }[];
      };
      const matches = (body.entry ?? []).filter((e) => e.search?.mode === 'match');
      if (
        r.status !== 200 ||
        body.resourceType !== 'Bundle' ||
        body.type !== 'searchset' ||
        matches.length < 1
      )
        throw new Error(
          `search '${name}' (${p}) answered ${r.status} with ${matches.length} matches: ${r.body.toString().slice(0, 500)}`,
        );
      if (type === 'Patient' && !matches.some((m) => m.resource?.id === t.pid))
        throw new Error(`search '${name}' (${p}) did not return the target patient ${t.pid}`);
      counts.push(matches.length);
    }
    counts.sort((a, b) => a - b);
    out[name] = {
      requests: counts.length,
      matches: { min: counts[0]!, median: counts[Math.floor(counts.length / 2)]!, max: counts.at(-1)! },
    };
  }
  return out;
}

const hr = () => Number(process.hrtime.bigint() / 1000n); // µs, the clock of .cpuprofile timestamps

async function measure(
  s: Session,
  name: string,
  paths: string[],
  seconds: number,
  concurrency = cfg.concurrency,
) {
  const foreignBefore = await waitForQuiet(serverPids(s));
  const from = hr();
  const a = cpuSnap(serverPids(s));
  const r = await runLoad({
    client: s.client,
    concurrency,
    total: seconds * 20_000,
    maxSeconds: seconds,
    build: (i) => ({ method: 'GET', path: paths[i % paths.length]!, headers: fhirHeaders(s.token, false) }),
  });
  const b = cpuSnap(serverPids(s));
  const to = hr();
  const cpu = cpuDelta(a, b);
  log(
    `  ${name}${concurrency !== cfg.concurrency ? ` (concurrency ${concurrency})` : ''}: ${r.perSecond}/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms, statuses ${JSON.stringify(r.statuses)}, cpu ${JSON.stringify(cpu)}`,
  );
  const { capped: _capped, ...rest } = r;
  return {
    ...rest,
    cpuCores: { ...cpu, foreignBefore },
    cpuMsPerRequest: perRequest(a, b, r.requests),
    window: flags['cpu-prof-dir'] ? { from, to, pid: s.child.proc.pid } : undefined,
  };
}

type Measured = Awaited<ReturnType<typeof measure>>;

async function searchPhase(s: Session, targets: Target[], seconds: number) {
  log('  verifying every search for every target…');
  const verification = await verifySearches(s, targets);
  const rnd = prng(42);
  const mixedPaths = targets
    .flatMap((t) => SEARCHES.map(([, type, params]) => searchPath(type, params(t))))
    .map((p) => ({ p, r: rnd() }))
    .sort((a, b) => a.r - b.r)
    .map((x) => x.p);
  const readPaths = targets.map((t) => `/fhir/R4/Patient/${t.pid}`);
  if (cfg.warmup > 0) {
    log(`  warm-up: ${cfg.warmup} s of mixed searches and reads (not measured)`);
    await runLoad({
      client: s.client,
      concurrency: cfg.concurrency,
      total: cfg.warmup * 20_000,
      maxSeconds: cfg.warmup,
      build: (i) => ({
        method: 'GET',
        path: i % 5 === 0 ? readPaths[i % readPaths.length]! : mixedPaths[i % mixedPaths.length]!,
        headers: fhirHeaders(s.token, false),
      }),
    });
  }
  // Latency without queueing: one request in flight (closed loop at --concurrency measures
  // throughput, and its latency is mostly waiting: p50 ≈ concurrency ÷ throughput).
  const unloaded = async (name: string, paths: string[]) => {
    if (cfg.latencyDuration === 0) return undefined;
    const m = await measure(s, name, paths, cfg.latencyDuration, 1);
    return {
      concurrency: 1,
      perSecond: m.perSecond,
      latencyMs: m.latencyMs,
      cpuMsPerRequest: m.cpuMsPerRequest,
    };
  };
  const read = await measure(s, 'read Patient/{id} (baseline)', readPaths, seconds);
  const readUnloaded = await unloaded('read Patient/{id} (baseline)', readPaths);
  const searches: Record<
    string,
    Measured & {
      example: string;
      unloaded?: Awaited<ReturnType<typeof unloaded>>;
      p50OverReadP50: number;
      readsPerSearch: number;
    }
  > = {};
  for (const [name, type, params] of cfg.mixedOnly ? [] : SEARCHES) {
    const paths = targets.map((t) => searchPath(type, params(t)));
    const m = await measure(s, name, paths, seconds);
    const u = await unloaded(name, paths);
    searches[name] = {
      example: paths[0]!,
      ...m,
      unloaded: u,
      p50OverReadP50: round(m.latencyMs.p50 / read.latencyMs.p50, 2),
      readsPerSearch: round(read.perSecond / m.perSecond, 2),
    };
  }
  const mixed = await measure(s, 'mixed (every search, interleaved)', mixedPaths, seconds);
  return { verification, read: { ...read, unloaded: readUnloaded }, searches, mixed };
}

// ---- write cost of indexing --------------------------------------------------------------------

function syntheticObservation(pid: string, i: number): string {
  const r = prng(i + 1);
  const day = `20${String(10 + Math.floor(r() * 15))}-${String(1 + Math.floor(r() * 12)).padStart(2, '0')}-${String(1 + Math.floor(r() * 28)).padStart(2, '0')}`;
  return JSON.stringify({
    resourceType: 'Observation',
    meta: { security: [HTEST] },
    status: 'final',
    category: [
      {
        coding: [
          { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' },
        ],
      },
    ],
    code: {
      coding: [{ system: 'http://loinc.org', code: '8867-4', display: 'Heart rate' }],
      text: 'Heart rate',
    },
    subject: { reference: `Patient/${pid}` },
    effectiveDateTime: `${day}T10:00:00Z`,
    valueQuantity: {
      value: 40 + Math.floor(r() * 80),
      unit: '/min',
      system: 'http://unitsofmeasure.org',
      code: '/min',
    },
    note: [{ text: 'Synthetic benchmark observation (HTEST): not clinical data' }],
  });
}

async function createPhase(s: Session, pid: string, seconds: number, offset: number, quiet = true) {
  const foreignBefore = quiet ? await waitForQuiet(serverPids(s)) : undefined;
  const a = cpuSnap(serverPids(s));
  const r = await runLoad({
    client: s.client,
    concurrency: cfg.concurrency,
    total: seconds * 5_000,
    maxSeconds: seconds,
    build: (i) => ({
      method: 'POST',
      path: '/fhir/R4/Observation',
      headers: fhirHeaders(s.token, true),
      body: syntheticObservation(pid, offset + i),
    }),
  });
  const b = cpuSnap(serverPids(s));
  const { capped: _capped, ...rest } = r;
  return {
    ...rest,
    cpuCores: { ...cpuDelta(a, b), foreignBefore },
    cpuMsPerRequest: perRequest(a, b, r.requests),
  };
}

/** Runs the rounds; `sessions` holds the running server (the search phase's, indexing on) and is kept current. */
async function writePhase(sessions: Session[], env: NodeJS.ProcessEnv, logFile: string, creds: Creds) {
  const first = sessions.at(-1)!;
  // One obviously synthetic patient for the observations' subject.
  const pr = await first.client.send({
    method: 'POST',
    path: '/fhir/R4/Patient',
    headers: fhirHeaders(first.token, true),
    body: JSON.stringify({
      resourceType: 'Patient',
      meta: { security: [HTEST] },
      name: [{ family: 'Testpatient', given: ['Benchmark'] }],
      gender: 'unknown',
      birthDate: '1970-01-01',
    }),
  });
  const pid = /\/Patient\/([A-Za-z0-9\-.]+)\/_history\//.exec(String(pr.headers.location ?? ''))?.[1];
  if (pr.status !== 201 || !pid) throw new Error(`could not create the synthetic patient: ${pr.status}`);
  const rounds: (LoadResult & { indexing: 'on' | 'off'; cpuMsPerRequest: Json; cpuCores: Json })[] = [];
  let current: Session | undefined = first;
  let offset = 0;
  for (let i = 0; i < cfg.writeRounds; i++) {
    for (const mode of ['on', 'off'] as const) {
      if (!current) {
        log(`  starting the server with CUSTOS_SEARCH_INDEXING=${mode}`);
        current = (await openSession({ ...env, CUSTOS_SEARCH_INDEXING: mode }, logFile, creds)).session;
        sessions.push(current);
      }
      // Warm-up (not measured): 2 s of creates.
      await createPhase(current, pid, 2, 10_000_000 + offset, false);
      offset += 100_000;
      const r = await createPhase(current, pid, cfg.writeDuration, offset);
      offset += 100_000;
      log(
        `  creates, indexing ${mode}: ${r.perSecond}/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms, statuses ${JSON.stringify(r.statuses)}, cpu ms/create ${JSON.stringify(r.cpuMsPerRequest)}`,
      );
      if (r.ok === 0) throw new Error(`creates failed: ${JSON.stringify(r.statuses)}`);
      rounds.push({ indexing: mode, ...r, capped: false });
      sessions.pop();
      await current.stop();
      current = undefined;
    }
  }
  const agg = (mode: 'on' | 'off') => {
    const rs = rounds.filter((r) => r.indexing === mode);
    const mean = (f: (r: (typeof rs)[number]) => number) =>
      round(rs.reduce((a, r) => a + f(r), 0) / rs.length, 2);
    return {
      perSecond: mean((r) => r.perSecond),
      p50: mean((r) => r.latencyMs.p50),
      p99: mean((r) => r.latencyMs.p99),
      cpuMsPerCreate: {
        server: mean((r) => Number((r.cpuMsPerRequest as { server: number }).server)),
        postgres: mean((r) => Number((r.cpuMsPerRequest as { postgres: number }).postgres)),
      },
    };
  };
  const on = agg('on');
  const off = agg('off');
  return {
    what: 'POST /fhir/R4/Observation (synthetic, HTEST, one synthetic subject) at --concurrency; rounds alternate the default server (indexing on) and CUSTOS_SEARCH_INDEXING=off on the same data, each after a 2 s warm-up',
    indexingOn: on,
    indexingOff: off,
    createsPerSecondOffOverOn: round(off.perSecond / on.perSecond, 2),
    cpuMsPerCreateOnOverOff: round(
      (on.cpuMsPerCreate.server + on.cpuMsPerCreate.postgres) /
        (off.cpuMsPerCreate.server + off.cpuMsPerCreate.postgres),
      2,
    ),
    rounds,
  };
}

// ---- EXPLAIN ----------------------------------------------------------------------------------

interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Index Name'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  Plans?: PlanNode[];
}

function scansOf(node: PlanNode, out: string[] = []): string[] {
  if (node['Relation Name'] || node['Index Name'])
    out.push(
      `${node['Node Type']}${node['Relation Name'] ? ` on ${node['Relation Name']}` : ''}${node['Index Name'] ? ` using ${node['Index Name']}` : ''}`,
    );
  for (const c of node.Plans ?? []) scansOf(c, out);
  return out;
}

async function ginStats(db: Db) {
  try {
    await db.query('CREATE EXTENSION IF NOT EXISTS pgstattuple');
    const r = await db.query<{ pending_pages: number; pending_tuples: string }>(
      "SELECT pending_pages, pending_tuples FROM pgstatginindex('resource_search_keys')",
    );
    return { pendingPages: Number(r[0]!.pending_pages), pendingTuples: Number(r[0]!.pending_tuples) };
  } catch (e) {
    return { error: e instanceof Error ? e.message.slice(0, 200) : String(e) };
  }
}

/** Search plans after the write phase: with the GIN pending list its creates left, and after cleaning it. */
async function ginPendingEffect(db: Db, projectId: string, targets: Target[]) {
  log('  EXPLAIN after the write phase (GIN pending list as the creates left it)…');
  const before = await ginStats(db);
  const withList = await explainSearches(db, projectId, targets, false);
  const t0 = performance.now();
  await db.query("SELECT gin_clean_pending_list('resource_search_keys'::regclass)");
  const cleanSeconds = sec(t0);
  const afterClean = await ginStats(db);
  const cleaned = await explainSearches(db, projectId, targets, false);
  const rows: Record<string, { withPendingListMs: unknown; afterCleanMs: unknown }> = {};
  for (const name of Object.keys(withList))
    rows[name] = {
      withPendingListMs: withList[name]!.executionMsByTarget,
      afterCleanMs: cleaned[name]!.executionMsByTarget,
    };
  log(
    `  GIN pending list ${JSON.stringify(before)} → ${JSON.stringify(afterClean)}: ${JSON.stringify(rows)}`,
  );
  return {
    what: 'EXPLAIN ANALYZE execution time of each page query after the write phase (its creates sit in the GIN pending list, fastupdate on), then after gin_clean_pending_list()',
    pendingBefore: before,
    pendingAfterClean: afterClean,
    cleanSeconds,
    executionMs: rows,
  };
}

/**
 * Runs one search through `runSearch` on `run`, recording its statements: the page statement (the one
 * with ORDER BY, else the first) and how many statements it took.
 */
async function captureSearch(
  run: <R>(sql: string, params?: unknown[]) => Promise<R[]>,
  projectId: string,
  type: string,
  params: [string, string][],
): Promise<{ page: { sql: string; params: unknown[] }; statements: number }> {
  const captured: { sql: string; params: unknown[] }[] = [];
  const q: SqlQueryable = {
    query: async <R>(sql: string, p: readonly unknown[] = []) => {
      captured.push({ sql, params: [...p] });
      return { rows: await run<R>(sql, [...p]) };
    },
  };
  const req = parseSearch([type], new URLSearchParams(params), { strict: true });
  await runSearch(q, req, { projectId, canRead: () => true, baseUrl: 'http://127.0.0.1/fhir/R4' });
  return { page: captured.find((c) => /ORDER BY/.test(c.sql)) ?? captured[0]!, statements: captured.length };
}

/**
 * The SQL the server runs for each search (built by src/store/search-sql.ts), planned with
 * EXPLAIN (ANALYZE, BUFFERS) for a few targets spread over the copies; the middle one's plan is kept.
 */
async function explainSearches(db: Db, projectId: string, targets: Target[], verbose = true) {
  const out: Record<string, Json & { executionMs: number }> = {};
  const picks = [...new Set([0, 1, 2, 3].map((i) => Math.round((i * (targets.length - 1)) / 3)))].map(
    (i) => targets[i]!,
  );
  const middle = targets[Math.floor(targets.length / 2)]!;
  if (!picks.includes(middle)) picks.unshift(middle);
  for (const [name, type, params] of SEARCHES) {
    const runs: { pid: string; executionMs: number; planningMs: number; scans: string[] }[] = [];
    let kept: Json = {};
    for (const t of picks) {
      const { page: main, statements } = await captureSearch(db.query, projectId, type, params(t));
      await db.query(`EXPLAIN (ANALYZE) ${main.sql}`, main.params); // warm the cache
      const json = (
        await db.query<{ 'QUERY PLAN': unknown }>(
          `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ${main.sql}`,
          main.params,
        )
      )[0]!['QUERY PLAN'];
      const plan = (typeof json === 'string' ? JSON.parse(json) : json) as {
        Plan: PlanNode;
        'Execution Time': number;
        'Planning Time': number;
      }[];
      runs.push({
        pid: t.pid,
        executionMs: round(plan[0]!['Execution Time'], 3),
        planningMs: round(plan[0]!['Planning Time'], 3),
        scans: scansOf(plan[0]!.Plan),
      });
      if (t === middle) {
        const text = (
          await db.query<{ 'QUERY PLAN': string }>(`EXPLAIN (ANALYZE, BUFFERS) ${main.sql}`, main.params)
        ).map((r) => r['QUERY PLAN']);
        kept = {
          statements,
          sql: main.sql.replace(/\s+/g, ' '),
          params: main.params,
          plan: text,
        };
      }
    }
    const scans = [...new Set(runs.flatMap((r) => r.scans))];
    const seqScans = scans.filter((x) =>
      /^Seq Scan on (resource|search_string|search_date|search_number)$/.test(x),
    );
    const m = runs.find((r) => r.pid === middle.pid)!;
    out[name] = {
      executionMs: m.executionMs,
      executionMsByTarget: Object.fromEntries(runs.map((r) => [r.pid, r.executionMs])),
      planningMs: m.planningMs,
      scans,
      seqScans,
      plannedFor: middle.pid,
      ...kept,
    };
    if (verbose)
      log(
        `  EXPLAIN ${name}: ${runs.map((r) => r.executionMs).join(' / ')} ms; ${scans.join('; ')}${seqScans.length ? ' ← SEQ SCAN' : ''}`,
      );
  }
  return out;
}

/** CPU time (ns) a process has run, from /proc/<pid>/schedstat (nanosecond resolution). */
function schedNs(pid: number): number {
  return Number(fs.readFileSync(`/proc/${pid}/schedstat`, 'utf8').split(' ')[0]);
}

/**
 * PostgreSQL's CPU per search statement, unprepared (parse, analyse, plan and run each time) against
 * prepared once per connection and planned for each call's values, as the server's search pool does
 * (src/store/pg/pg-driver.ts `bounded`: `plan_cache_mode = force_custom_plan`). One connection of
 * our own, no server and no other load of ours: the backend's CPU (schedstat) is the statement's cost
 * alone. Each run measures both modes, in alternating order, each over every target's page statement
 * several times; the ratio is prepared / unprepared of the medians.
 */
async function statementCost(url: string, projectId: string, targets: Target[], runs: number) {
  const c = new pg.Client({ connectionString: url, options: '-c plan_cache_mode=force_custom_plan' });
  await c.connect();
  const pid = (await c.query<{ p: number }>('SELECT pg_backend_pid() AS p')).rows[0]!.p;
  const passes = 8;
  const out: Record<string, { unpreparedMs: number; preparedMs: number; ratio: number }> = {};
  let n = 0;
  try {
    for (const [name, type, params] of SEARCHES) {
      const statements: { sql: string; params: unknown[] }[] = [];
      const run = async <R>(sql: string, p?: unknown[]) => (await c.query(sql, p)).rows as R[];
      for (const t of targets) statements.push((await captureSearch(run, projectId, type, params(t))).page);
      const texts = new Map<string, string>();
      const perMode: Record<'unprepared' | 'prepared', number[]> = { unprepared: [], prepared: [] };
      for (let r = 0; r < runs; r++) {
        const order =
          r % 2 === 0 ? (['unprepared', 'prepared'] as const) : (['prepared', 'unprepared'] as const);
        for (const mode of order) {
          const t0 = schedNs(pid);
          for (let k = 0; k < passes; k++)
            for (const st of statements) {
              if (mode === 'unprepared') await c.query(st.sql, st.params);
              else {
                let stName = texts.get(st.sql);
                if (!stName) texts.set(st.sql, (stName = `bench_s${n++}`));
                await c.query({ name: stName, text: st.sql, values: st.params });
              }
            }
          perMode[mode].push((schedNs(pid) - t0) / 1e6 / (passes * statements.length));
        }
      }
      const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
      const u = med(perMode.unprepared);
      const pr = med(perMode.prepared);
      out[name] = { unpreparedMs: round(u, 3), preparedMs: round(pr, 3), ratio: round(pr / u, 3) };
      log(
        `  statement ${name}: ${round(u, 3)} → ${round(pr, 3)} ms of PostgreSQL CPU (× ${round(pr / u, 2)})`,
      );
    }
  } finally {
    await c.end();
  }
  const all = Object.values(out);
  const mean = (f: (x: (typeof all)[number]) => number) => all.reduce((a, x) => a + f(x), 0) / all.length;
  return {
    what: `PostgreSQL backend CPU per search page statement (schedstat), one connection, ${passes} passes over every target per mode and run, ${runs} runs alternating the order; medians of runs`,
    meanUnpreparedMs: round(
      mean((x) => x.unpreparedMs),
      3,
    ),
    meanPreparedMs: round(
      mean((x) => x.preparedMs),
      3,
    ),
    searches: out,
  };
}

// ---- one storage ------------------------------------------------------------------------------

/** Where --keep-db NAME keeps one storage's data set. */
function keptPaths(kind: 'postgres' | 'embedded', name: string) {
  return {
    dataDir: path.join(os.tmpdir(), `custos-search-bench-${name}-${kind}`),
    dbName: `custos_bench_${name}`,
  };
}

/** What a kept data set needs to be measured again without rebuilding it. */
interface KeptState {
  target: number;
  creds: Creds;
  import: unknown;
  dataSet: unknown;
  targets: Target[];
  targetsInfo: unknown;
  builtAt: string;
}

async function dropKept(name: string): Promise<void> {
  for (const kind of ['postgres', 'embedded'] as const) {
    const k = keptPaths(kind, name);
    if (fs.existsSync(k.dataDir)) {
      fs.rmSync(k.dataDir, { recursive: true, force: true });
      log(`removed ${k.dataDir}`);
    }
    if (kind !== 'postgres') continue;
    if (!pgAdminUrl) {
      log(
        `databases ${k.dbName}[_audit] not dropped: set CUSTOS_BENCH_DATABASE_URL (or CUSTOS_TEST_DATABASE_URL) to drop them`,
      );
      continue;
    }
    for (const db of [k.dbName, `${k.dbName}_audit`]) {
      await adminQuery(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
      log(`dropped database ${db} (if it existed)`);
    }
  }
}

async function benchStorage(kind: 'postgres' | 'embedded', synthea: PreparedBundle[]) {
  const target = kind === 'postgres' ? cfg.resources : cfg.embeddedResources;
  const kept = keepName !== undefined ? keptPaths(kind, keepName) : undefined;
  const statePath = kept && path.join(kept.dataDir, 'bench-state.json');
  let state =
    statePath && fs.existsSync(statePath)
      ? (JSON.parse(fs.readFileSync(statePath, 'utf8')) as KeptState)
      : undefined;
  if (state && state.target !== target)
    throw new Error(
      `the data set kept as '${keepName}' was built for ${state.target} resources, not ${target}: use another NAME or --drop-kept ${keepName}`,
    );
  let dataDir: string;
  if (kept) {
    if (!state) {
      // Nothing kept, or a half-built leftover: start clean.
      fs.rmSync(kept.dataDir, { recursive: true, force: true });
      if (kind === 'postgres')
        for (const db of [kept.dbName, `${kept.dbName}_audit`])
          await adminQuery(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
    }
    fs.mkdirSync(kept.dataDir, { recursive: true, mode: 0o700 });
    dataDir = kept.dataDir;
  } else dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-search-bench-'));
  const logFile = path.join(dataDir, 'server.log');
  const env: Record<string, string> = { CUSTOS_DATA_DIR: dataDir, CUSTOS_LOG_LEVEL: 'info' };
  if (cfg.poolSize !== undefined) env.CUSTOS_DATABASE_POOL_SIZE = String(cfg.poolSize);
  let dbName: string | undefined;
  const sessions: Session[] = [];
  const dbs: Db[] = [];
  const out: Json = { storage: kind };
  benchDbName = undefined;
  pgOwner.clear();
  const seconds = kind === 'postgres' ? cfg.duration : cfg.embeddedDuration;
  let failed = true;
  try {
    if (kind === 'postgres') {
      dbName = kept ? kept.dbName : `custos_bench_${randomBytes(6).toString('hex')}`;
      benchDbName = dbName;
      if (!state) {
        await adminQuery(`CREATE DATABASE ${dbName}`);
        await adminQuery(`CREATE DATABASE ${dbName}_audit`);
      }
      env.CUSTOS_DATABASE_URL = withDatabase(pgAdminUrl!, dbName);
      env.CUSTOS_AUDIT_DATABASE_URL = withDatabase(pgAdminUrl!, `${dbName}_audit`);
      out.databases = [dbName, `${dbName}_audit`];
    }
    const serverEnv = cleanEnv({ ...env, CUSTOS_PORT: String(await freePort()) });
    const openDbs = async () => {
      if (kind === 'embedded') dbs.push(await openPglite(dataPaths(dataDir).resources));
      else for (let i = 0; i < cfg.cloneParallel; i++) dbs.push(await openPg(env.CUSTOS_DATABASE_URL!));
    };
    let session: Session | undefined;
    if (!state) {
      log(`${kind}: starting Custos (data dir ${dataDir})`);
      const opened = await openSession(serverEnv, logFile);
      session = opened.session;
      const creds = opened.creds;
      sessions.push(session);
      log(`${kind}: importing ${synthea.length} Synthea bundles over HTTP…`);
      const imported = await importSynthea(session, synthea);
      log(`${kind}: import ${JSON.stringify(imported)}`);
      if (kind === 'embedded') {
        // PGlite is single-process: stop the server, open its data directory here, clone, restart.
        await session.stop();
        sessions.pop();
        session = undefined;
      }
      await openDbs();
      log(`${kind}: building the data set (≥ ${target} resources)…`);
      const built = await buildDataSet(dbs, kind, target, dataDir);
      const targets = await pickTargets(dbs[0]!, creds.projectId, built.eligible, built.clones);
      state = {
        target,
        creds,
        import: imported,
        dataSet: built.result,
        targets,
        targetsInfo: {
          patients: targets.length,
          copies: [...new Set(targets.map((t) => t.copy))],
          how: 'patients with every resource type the searches need, spread over the copies; values taken from their rows (identifier: the Synthea UUID identifier, rewritten per copy; Observation: a lab result if any, else another, date=ge<its day>)',
        },
        builtAt: new Date().toISOString(),
      };
      if (statePath) {
        fs.writeFileSync(statePath, JSON.stringify(state), { mode: 0o600 });
        log(
          `${kind}: data set kept as '${keepName}' (${dataDir}${dbName ? `, databases ${dbName}[_audit]` : ''})`,
        );
      }
    } else {
      log(`${kind}: reusing the data set kept as '${keepName}' (built ${state.builtAt})`);
      out.reusedDataSet = { name: keepName, builtAt: state.builtAt };
      if (!cfg.skipExplain) await openDbs();
    }
    out.import = state.import;
    out.dataSet = state.dataSet;
    out.targets = state.targetsInfo;
    const { creds, targets } = state;
    if (!cfg.skipExplain) {
      log(`${kind}: EXPLAIN of each search's page query…`);
      out.explain = await explainSearches(dbs[0]!, creds.projectId, targets);
    }
    if (kind === 'postgres' && cfg.statementRuns > 0) {
      log(`${kind}: PostgreSQL CPU per search statement, unprepared and prepared…`);
      out.statementCost = await statementCost(
        env.CUSTOS_DATABASE_URL!,
        creds.projectId,
        targets,
        cfg.statementRuns,
      );
    }
    for (const db of dbs.splice(0)) await db.close();

    if (!session) {
      log(`${kind}: starting Custos on the data set`);
      session = (await openSession(serverEnv, logFile, creds)).session;
      sessions.push(session);
    }
    if (cfg.servers > 1 && kind === 'postgres') {
      log(`${kind}: starting ${cfg.servers - 1} more server process(es) on the same databases`);
      const i = sessions.indexOf(session);
      session = await addServers(session, cfg.servers, serverEnv, dataDir);
      sessions[i] = session;
      out.servers = cfg.servers;
    }
    log(`${kind}: searches (${seconds} s each, concurrency ${cfg.concurrency})`);
    Object.assign(out, await searchPhase(session, targets, seconds));
    if (cfg.writes) {
      log(
        `${kind}: write cost of indexing (${cfg.writeRounds} rounds of on/off, ${cfg.writeDuration} s each)`,
      );
      out.writeCost = await writePhase(sessions, serverEnv, logFile, creds);
      // Every server is stopped now. The creates went through the GIN index's pending list
      // (fastupdate): the plans again, with that list, then after gin_clean_pending_list().
      const db =
        kind === 'postgres'
          ? await openPg(env.CUSTOS_DATABASE_URL!)
          : await openPglite(dataPaths(dataDir).resources);
      dbs.push(db);
      out.afterWrites = await ginPendingEffect(db, creds.projectId, targets);
      await db.close();
      dbs.pop();
    }
    const logText = fs.readFileSync(logFile, 'utf8');
    out.serverLog = { errorLines: (logText.match(/"level":"error"/g) ?? []).length };
    failed = false;
    return out;
  } finally {
    for (const s of sessions.reverse()) await s.stop().catch(() => {});
    for (const db of dbs) await db.close().catch(() => {});
    if (failed && fs.existsSync(logFile)) {
      const keptLog = path.join(os.tmpdir(), `custos-search-bench-${kind}-server.log`);
      fs.copyFileSync(logFile, keptLog);
      log(`${kind}: server log kept in ${keptLog}`);
    }
    if (!kept) {
      fs.rmSync(dataDir, { recursive: true, force: true });
      if (dbName) {
        for (const name of [dbName, `${dbName}_audit`])
          await adminQuery(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`).catch((e: unknown) =>
            log(`drop ${name}: ${String(e)}`),
          );
      }
    } else fs.rmSync(logFile, { force: true });
  }
}

async function machine() {
  const cpus = os.cpus();
  const m: Json = {
    cores: cpus.length,
    cpuModel: cpus[0]?.model,
    memoryGB: Math.round(os.totalmem() / 2 ** 30),
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    sharing: `the load generator (this process), the server child and PostgreSQL share the ${cpus.length} cores`,
  };
  if (pgAdminUrl) {
    try {
      m.postgres = (
        await adminQuery(
          `SELECT current_setting('server_version') AS version, current_setting('shared_buffers') AS shared_buffers,
                  current_setting('work_mem') AS work_mem, current_setting('fsync') AS fsync,
                  current_setting('synchronous_commit') AS synchronous_commit`,
        )
      ).rows[0];
    } catch (e) {
      m.postgres = { error: String(e) };
    }
  }
  return m;
}

function compactJson(value: unknown, indent = ''): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  const entries: [string | undefined, unknown][] = Array.isArray(value)
    ? value.map((v) => [undefined, v === undefined ? null : v])
    : Object.entries(value as Json).filter(([, v]) => v !== undefined);
  const [open, close] = Array.isArray(value) ? ['[', ']'] : ['{', '}'];
  if (entries.length === 0) return `${open}${close}`;
  const key = (k: string | undefined) => (k === undefined ? '' : `${JSON.stringify(k)}: `);
  if (entries.every(([, v]) => v === null || typeof v !== 'object')) {
    const line = `${open}${entries.map(([k, v]) => `${key(k)}${JSON.stringify(v)}`).join(', ')}${close}`;
    if (line.length + indent.length <= 140) return line;
  }
  const inner = `${indent}  `;
  return `${open}\n${entries.map(([k, v]) => `${inner}${key(k)}${compactJson(v, inner)}`).join(',\n')}\n${indent}${close}`;
}

async function main() {
  const t0 = performance.now();
  if (flags['drop-kept'] !== undefined) {
    await dropKept(flags['drop-kept']);
    return;
  }
  if (!fs.existsSync(flags.synthea))
    throw new Error(`${flags.synthea} is absent: the data set is built from it`);
  log(`preparing Synthea bundles from ${flags.synthea} (adding HTEST labels)`);
  const synthea = prepareSynthea(flags.synthea);
  const result: Json = {
    bench: 'custos-search',
    command: `npm run -s bench:search${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    startedAt: new Date().toISOString(),
    config: {
      ...cfg,
      server: 'child process: node --import tsx src/cli/main.ts serve, every control on (auditing included)',
      client:
        'this process: node:http keep-alive agent, closed loop, one socket per request in flight; bearer token, X-Purpose-Of-Use: TREAT',
    },
    machine: await machine(),
  };
  const storages: Json = {};
  for (const kind of ['postgres', 'embedded'] as const) {
    if (kind === 'postgres' && (flags['skip-postgres'] || !pgAdminUrl)) {
      storages[kind] = {
        skipped: flags['skip-postgres']
          ? '--skip-postgres'
          : 'set CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL',
      };
      continue;
    }
    if (kind === 'embedded' && flags['skip-embedded']) {
      storages[kind] = { skipped: '--skip-embedded' };
      continue;
    }
    try {
      storages[kind] = await benchStorage(kind, synthea);
    } catch (e) {
      log(`${kind}: FAILED: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      storages[kind] = { error: e instanceof Error ? e.message : String(e) };
      process.exitCode = 1;
    }
  }
  result.storages = storages;
  type S = {
    dataSet?: { resources?: number };
    searches?: Record<string, { latencyMs: { p50: number }; unloaded?: { latencyMs: { p50: number } } }>;
    mixed?: { perSecond: number };
    explain?: Record<string, { seqScans: string[] }>;
  };
  const summary = (s: S | undefined) =>
    s?.searches && {
      resources: s.dataSet?.resources,
      searchesWithP50Under5ms: Object.values(s.searches).filter((x) => x.latencyMs.p50 < 5).length,
      searchesWithUnloadedP50Under5ms: Object.values(s.searches).filter(
        (x) => (x.unloaded?.latencyMs.p50 ?? Infinity) < 5,
      ).length,
      searches: Object.keys(s.searches).length,
      slowest: Object.entries(s.searches)
        .sort((a, b) => b[1].latencyMs.p50 - a[1].latencyMs.p50)
        .slice(0, 3)
        .map(
          ([n, x]) =>
            `${n}: p50 ${x.latencyMs.p50} ms (${x.unloaded?.latencyMs.p50 ?? '–'} ms at concurrency 1)`,
        ),
      mixedSearchesPerSecond: s.mixed?.perSecond,
      seqScans: Object.entries(s.explain ?? {})
        .filter(([, x]) => x.seqScans.length > 0)
        .map(([n, x]) => `${n}: ${x.seqScans.join(', ')}`),
      targets: {
        [`every search p50 < 5 ms at concurrency ${cfg.concurrency}`]: Object.values(s.searches).every(
          (x) => x.latencyMs.p50 < 5,
        ),
        'every search p50 < 5 ms at concurrency 1': Object.values(s.searches).every(
          (x) => (x.unloaded?.latencyMs.p50 ?? Infinity) < 5,
        ),
        'mixed searches ≥ 1,000/s': (s.mixed?.perSecond ?? 0) >= 1000,
      },
    };
  result.summary = {
    postgres: summary(storages.postgres as S | undefined),
    embedded: summary(storages.embedded as S | undefined),
  };
  result.totalSeconds = sec(t0);
  process.stdout.write(`${compactJson(result)}\n`);
}

await main();
