/**
 * Custos HTTP benchmark: `npm run bench` (= node --import tsx bench/http-bench.ts [flags]).
 *
 * For each storage (embedded PGlite; and a PostgreSQL server when CUSTOS_BENCH_DATABASE_URL or
 * CUSTOS_TEST_DATABASE_URL is set, in fresh databases custos_bench_<hex> and <same>_audit that are
 * dropped at the end) it starts the real server as a child process (`src/cli/main.ts serve`, every
 * control on: OAuth bearer token, purpose of use, scopes, validation, Provenance, audit group
 * commit, request log) and drives it over loopback HTTP from this process:
 *
 *   create   POST /fhir/R4/Patient of synthetic HTEST-labelled patients
 *   read     GET /fhir/R4/Patient/{id} of the created ids
 *   import   every transaction bundle of ../shared/data/synthea-r4 POSTed to /fhir/R4; Synthea data
 *            is not labelled, and sandbox projects refuse unlabelled data, so the importer adds
 *            meta.security HTEST to every entry's resource (as our importers do)
 *   baseline a bare node:http server (bench/baseline-server.ts) over the same `resource` table and
 *            the same driver: reads by primary key, bare INSERTs, bare versioned INSERTs
 *   profile  the server again under `node --cpu-prof`, its create and read phases summarized by
 *            bench/profile-summary.ts
 *
 * Prints ONE JSON document on stdout; progress goes to stderr. The load generator is this process
 * and the servers are children: on a 2-core machine they share the cores (see `cpu` in the output).
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
import {
  HttpClient,
  prng,
  runLoad,
  summarize,
  type LoadResult,
  type Reply,
  type RequestSpec,
} from './load.ts';
import { readProfile, summarizeProfile, type ProfileSummary } from './profile-summary.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };

const { values: flags } = parseArgs({
  options: {
    concurrency: { type: 'string', default: '16' },
    creates: { type: 'string', default: '2000' },
    reads: { type: 'string', default: '8000' },
    warmup: { type: 'string', default: '300' },
    'import-parallel': { type: 'string', default: '3' },
    'max-phase-seconds': { type: 'string', default: '30' },
    storage: { type: 'string', default: 'embedded,postgres' },
    synthea: { type: 'string', default: path.join(repoRoot, '..', 'shared', 'data', 'synthea-r4') },
    'no-import': { type: 'boolean', default: false },
    'no-baseline': { type: 'boolean', default: false },
    'no-profile': { type: 'boolean', default: false },
    'profile-creates': { type: 'string', default: '1000' },
    'profile-reads': { type: 'string', default: '4000' },
    'profile-import-bundles': { type: 'string', default: '10' },
    'profile-dir': { type: 'string' },
    'quiet-wait': { type: 'string', default: '20' },
    seed: { type: 'string', default: '20240601' },
    help: { type: 'boolean', default: false },
  },
  allowPositionals: false,
});

if (flags.help) {
  process.stderr
    .write(`usage: npm run bench -- [--concurrency 16] [--creates 2000] [--reads 8000] [--warmup 300]
  [--import-parallel 3] [--max-phase-seconds 30] [--storage embedded,postgres] [--synthea DIR]
  [--no-import] [--no-baseline] [--no-profile] [--profile-creates 1000] [--profile-reads 4000]
  [--profile-import-bundles 10]
  [--profile-dir DIR] [--seed N] [--quiet-wait 20]
PostgreSQL runs when CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL is set.\n`);
  process.exit(0);
}

function int(name: string, v: string | undefined): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer`);
  return n;
}

const cfg = {
  concurrency: Math.max(1, int('concurrency', flags.concurrency)),
  creates: int('creates', flags.creates),
  reads: int('reads', flags.reads),
  warmup: int('warmup', flags.warmup),
  importParallel: Math.max(1, int('import-parallel', flags['import-parallel'])),
  maxPhaseSeconds: int('max-phase-seconds', flags['max-phase-seconds']),
  profileCreates: int('profile-creates', flags['profile-creates']),
  profileReads: int('profile-reads', flags['profile-reads']),
  profileImportBundles: int('profile-import-bundles', flags['profile-import-bundles']),
  seed: int('seed', flags.seed),
  quietWait: int('quiet-wait', flags['quiet-wait']),
  import: !flags['no-import'],
  baseline: !flags['no-baseline'],
  profile: !flags['no-profile'],
};
const pgAdminUrl = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL || undefined;
const wanted = new Set(flags.storage.split(',').map((s) => s.trim()));
const profileRoot = flags['profile-dir'] ?? fs.mkdtempSync(path.join(os.tmpdir(), 'custos-bench-profiles-'));

const log = (s: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

// ---- CPU accounting (Linux /proc): who used the cores during a phase --------------------------

interface CpuSnap {
  at: number;
  machineBusy: number;
  machineTotal: number;
  server: number;
  client: number;
  postgres: number;
}
const TICK = 100; // USER_HZ: clock ticks per second on Linux

function procTicks(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]); // utime + stime (fields 14 and 15)
  } catch {
    return 0;
  }
}

/** CPU ticks of every PostgreSQL server process (backends, walwriter, checkpointer, …). */
function postgresTicks(): number {
  let sum = 0;
  let dirs: string[];
  try {
    dirs = fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  } catch {
    return 0;
  }
  for (const d of dirs) {
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      if (stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) !== 'postgres') continue;
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      sum += Number(f[11]) + Number(f[12]);
    } catch {
      /* exited */
    }
  }
  return sum;
}

function cpuSnap(serverPid: number | undefined): CpuSnap {
  let machineBusy = 0;
  let machineTotal = 0;
  try {
    const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    machineTotal = v.slice(0, 8).reduce((a, b) => a + b, 0);
    machineBusy = machineTotal - (v[3] ?? 0) - (v[4] ?? 0); // minus idle and iowait
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

/**
 * Average cores in use during the interval: the whole machine, the server child (PGlite runs
 * inside it), this load generator, the PostgreSQL server processes, and `other` = the rest (other
 * processes on the machine and kernel time not charged to a process, e.g. loopback softirq).
 */
function cpuDelta(a: CpuSnap, b: CpuSnap) {
  const seconds = (b.at - a.at) / 1000;
  const cores = (ticks: number) => Math.round((ticks / TICK / seconds) * 100) / 100;
  const machineCores = os.cpus().length;
  const busyShare =
    b.machineTotal > a.machineTotal ? (b.machineBusy - a.machineBusy) / (b.machineTotal - a.machineTotal) : 0;
  const busy = Math.round(busyShare * machineCores * 100) / 100;
  const server = cores(b.server - a.server);
  const client = cores(b.client - a.client);
  const postgres = cores(b.postgres - a.postgres);
  return {
    machineCores,
    busy,
    server,
    client,
    postgres,
    other: Math.max(0, Math.round((busy - server - client - postgres) * 100) / 100),
  };
}

/**
 * Waits (up to --quiet-wait seconds) until the machine is quiet apart from us: other sessions may be
 * running test suites on the same cores. Returns the foreign load (cores) seen last.
 */
async function waitForQuiet(serverPid: number | undefined): Promise<number> {
  const deadline = performance.now() + cfg.quietWait * 1000;
  for (;;) {
    const a = cpuSnap(serverPid);
    await new Promise((r) => setTimeout(r, 1000));
    const d = cpuDelta(a, cpuSnap(serverPid));
    const foreign = Math.round((d.busy - d.client) * 100) / 100; // the server and PostgreSQL are idle between phases
    if (foreign <= 0.25 || performance.now() > deadline) {
      if (foreign > 0.25) log(`  machine still busy (${foreign} cores used by others); measuring anyway`);
      return foreign;
    }
    log(`  waiting for the machine to be quiet (${foreign} cores used by others)…`);
  }
}

// ---- child processes ----------------------------------------------------------------------------

/** process.env without any CUSTOS_* variable (the bench sets its own). */
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

function startChild(
  args: string[],
  env: NodeJS.ProcessEnv,
  ready: (stdout: string, stderr: string) => string | undefined,
  logFile: string,
  stdoutToFile: boolean,
): Promise<Child> {
  return new Promise((resolve, reject) => {
    const logFd = fs.openSync(logFile, 'a');
    // The request log (stdout) goes straight to the file, so that this process does not spend its CPU on it.
    const proc = spawn(process.execPath, args, {
      cwd: repoRoot,
      env,
      stdio: ['ignore', stdoutToFile ? logFd : 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    let done = false;
    const check = () => {
      const url = ready(out, err);
      if (url && !done) {
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
    };
    proc.stdout?.on('data', (c: Buffer) => {
      if (!done) out += c.toString();
      fs.writeSync(logFd, c);
      check();
    });
    proc.stderr!.on('data', (c: Buffer) => {
      err += c.toString();
      fs.writeSync(logFd, c);
      check();
    });
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      proc.kill('SIGKILL');
      reject(new Error(`child did not start in 90 s: ${err.slice(-2000)}`));
    }, 90_000);
    proc.once('exit', (code) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      reject(new Error(`child exited with ${code} before it was ready: ${err.slice(-2000)}`));
    });
  });
}

function startCustos(env: NodeJS.ProcessEnv, logFile: string, cpuProfDir?: string): Promise<Child> {
  const prof = cpuProfDir ? ['--cpu-prof', '--cpu-prof-dir', cpuProfDir] : [];
  return startChild(
    [...prof, '--import', 'tsx', 'src/cli/main.ts', 'serve'],
    env,
    (_o, e) => /listening on (\S+?)\)/.exec(e)?.[1],
    logFile,
    true,
  );
}

function startBaseline(env: NodeJS.ProcessEnv, logFile: string): Promise<Child> {
  return startChild(
    ['--import', 'tsx', 'bench/baseline-server.ts'],
    env,
    (o) => {
      const m = /\{"port":(\d+)\}/.exec(o);
      return m ? `http://127.0.0.1:${m[1]}` : undefined;
    },
    logFile,
    false,
  );
}

async function custosInit(
  env: NodeJS.ProcessEnv,
): Promise<{ projectId: string; clientId: string; clientSecret: string }> {
  const { stdout } = await promisify(execFile)(
    process.execPath,
    ['--import', 'tsx', 'src/cli/main.ts', 'init', '--json'],
    { cwd: repoRoot, env },
  );
  const r = JSON.parse(stdout) as { projectId: string; clientId: string; clientSecret?: string };
  if (!r.clientSecret) throw new Error('custos init returned no client secret (data directory not fresh?)');
  return { projectId: r.projectId, clientId: r.clientId, clientSecret: r.clientSecret };
}

/** A bearer token kept fresh in the background (tokens live 300 s). */
async function tokenKeeper(client: HttpClient, creds: { clientId: string; clientSecret: string }) {
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

// ---- workload --------------------------------------------------------------------------------

const GIVEN = ['Zzyzx', 'Qwerty', 'Testina', 'Fakeley', 'Sampleo', 'Mockery', 'Dummon', 'Placeholda'];

/** An obviously synthetic patient: family Testpatient, SSN 999-xx-xxxx, phone 555-01xx, HTEST. */
function syntheticPatient(i: number): Record<string, unknown> {
  const r = prng(cfg.seed * 7919 + i);
  const pick = <T>(a: readonly T[]) => a[Math.floor(r() * a.length)]!;
  const pad = (n: number, w: number) => String(n).padStart(w, '0');
  return {
    resourceType: 'Patient',
    meta: { security: [HTEST] },
    identifier: [
      {
        system: 'http://hl7.org/fhir/sid/us-ssn',
        value: `999-${pad(Math.floor(r() * 100), 2)}-${pad(Math.floor(r() * 10000), 4)}`,
      },
      { system: 'urn:custos:bench', value: `bench-${cfg.seed}-${i}` },
    ],
    active: true,
    name: [{ use: 'official', family: 'Testpatient', given: [pick(GIVEN), 'Benchmark'] }],
    telecom: [{ system: 'phone', value: `555-01${pad(Math.floor(r() * 100), 2)}`, use: 'home' }],
    gender: pick(['female', 'male', 'other', 'unknown'] as const),
    birthDate: `${1940 + Math.floor(r() * 80)}-${pad(1 + Math.floor(r() * 12), 2)}-${pad(1 + Math.floor(r() * 28), 2)}`,
    address: [
      { line: ['1 Test Street'], city: 'Testville', state: 'ZZ', postalCode: '00000', country: 'ZZ' },
    ],
  };
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

const createdId = (reply: Reply): string | undefined =>
  /\/Patient\/([A-Za-z0-9\-.]+)\/_history\//.exec(String(reply.headers.location ?? ''))?.[1];

/** Creates `n` patients (numbered from `offset`) and returns the load result and their ids. */
async function createPhase(
  client: HttpClient,
  prefix: string,
  token: { value: string },
  n: number,
  offset: number,
): Promise<{ result: LoadResult; ids: string[] }> {
  const bodies = Array.from({ length: n }, (_, i) => JSON.stringify(syntheticPatient(offset + i)));
  const ids: string[] = [];
  const result = await runLoad({
    client,
    concurrency: cfg.concurrency,
    total: n,
    maxSeconds: cfg.maxPhaseSeconds,
    build: (i): RequestSpec => ({
      method: 'POST',
      path: `${prefix}/fhir/R4/Patient`,
      headers: fhirHeaders(token, true),
      body: bodies[i],
    }),
    onReply: (_i, r) => {
      const id = createdId(r);
      if (r.status === 201 && id) ids.push(id);
    },
  });
  return { result, ids };
}

/** Reads `n` times from `ids`, in a seeded random order. */
async function readPhase(
  client: HttpClient,
  token: { value: string },
  ids: string[],
  n: number,
  seed: number,
): Promise<LoadResult> {
  const r = prng(seed);
  const order = Array.from({ length: n }, () => ids[Math.floor(r() * ids.length)]!);
  return runLoad({
    client,
    concurrency: cfg.concurrency,
    total: n,
    maxSeconds: cfg.maxPhaseSeconds,
    build: (i) => ({
      method: 'GET',
      path: `/fhir/R4/Patient/${order[i]}`,
      headers: fhirHeaders(token, false),
    }),
  });
}

interface PreparedBundle {
  file: string;
  body: Buffer;
  entries: number;
}

/** Reads every Synthea bundle and labels each entry's resource HTEST (sandbox projects refuse unlabelled data). */
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

async function importPhase(client: HttpClient, token: { value: string }, bundles: PreparedBundle[]) {
  const latencies: number[] = [];
  const failures: { file: string; status: number; code?: string; diagnostics?: string }[] = [];
  let next = 0;
  let resources = 0;
  let okBundles = 0;
  const start = performance.now();
  const worker = async () => {
    while (next < bundles.length) {
      const b = bundles[next++]!;
      const t0 = performance.now();
      let r: Reply;
      try {
        r = await client.send({
          method: 'POST',
          path: '/fhir/R4',
          headers: fhirHeaders(token, true),
          body: b.body,
        });
      } catch (e) {
        failures.push({ file: b.file, status: 0, code: (e as { code?: string }).code ?? 'error' });
        continue;
      }
      latencies.push(performance.now() - t0);
      if (r.status === 200) {
        okBundles++;
        resources += b.entries;
      } else {
        let code: string | undefined;
        let diagnostics: string | undefined;
        try {
          const oo = JSON.parse(r.body.toString()) as {
            issue?: {
              details?: { coding?: { code?: string }[] };
              diagnostics?: string;
              expression?: string[];
            }[];
          };
          code = oo.issue?.[0]?.details?.coding?.[0]?.code;
          diagnostics =
            [oo.issue?.[0]?.diagnostics, oo.issue?.[0]?.expression?.[0]].filter(Boolean).join(' @ ') ||
            undefined;
        } catch {
          /* not JSON */
        }
        failures.push({ file: b.file, status: r.status, code, diagnostics });
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(cfg.importParallel, bundles.length) }, worker));
  const seconds = (performance.now() - start) / 1000;
  return {
    bundles: bundles.length,
    bundlesOk: okBundles,
    resources,
    megabytes: Math.round(bundles.reduce((a, b) => a + b.body.length, 0) / 1e5) / 10,
    parallel: cfg.importParallel,
    seconds: Math.round(seconds * 1000) / 1000,
    resourcesPerSecond: Math.round((resources / seconds) * 10) / 10,
    bundleLatencyMs: summarize(latencies),
    failuresTotal: failures.length,
    failures: failures.slice(0, 10),
    labelled:
      'importer added meta.security HTEST (v3-ActReason) to every entry resource; Synthea data is not labelled',
  };
}

// ---- one storage --------------------------------------------------------------------------------

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

const hr = () => Number(process.hrtime.bigint() / 1000n); // µs, the clock of .cpuprofile timestamps

async function measurePhase<T extends { result: LoadResult } | LoadResult>(
  serverPid: number | undefined,
  name: string,
  run: () => Promise<T>,
) {
  const foreignBefore = await waitForQuiet(serverPid);
  log(`  ${name}…`);
  const from = hr();
  const a = cpuSnap(serverPid);
  const out = await run();
  const b = cpuSnap(serverPid);
  const to = hr();
  const cpu = cpuDelta(a, b);
  const r: LoadResult = 'result' in out ? (out as { result: LoadResult }).result : (out as LoadResult);
  log(
    `  ${name}: ${r.perSecond}/s, p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms, statuses ${JSON.stringify(r.statuses)}, cpu ${JSON.stringify(cpu)}`,
  );
  return {
    out,
    cpu: { ...cpu, foreignBefore },
    cpuMsPerRequest: perRequest(a, b, r.requests),
    window: { from, to },
  };
}

/** CPU milliseconds per request spent by the server child, PostgreSQL and this client: robust to other load on the machine. */
function perRequest(a: CpuSnap, b: CpuSnap, requests: number) {
  const ms = (ticks: number) =>
    requests > 0 ? Math.round(((ticks / TICK) * 1000 * 100) / requests) / 100 : null;
  return {
    server: ms(b.server - a.server),
    postgres: ms(b.postgres - a.postgres),
    client: ms(b.client - a.client),
  };
}

async function benchStorage(kind: 'embedded' | 'postgres', synthea: PreparedBundle[] | string) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-bench-'));
  const logFile = path.join(dataDir, 'server.log');
  const env: Record<string, string> = { CUSTOS_DATA_DIR: dataDir, CUSTOS_LOG_LEVEL: 'info' };
  let dbName: string | undefined;
  const children: Child[] = [];
  const timers: { stop(): void }[] = [];
  let failed = true;
  const out: Record<string, unknown> = { storage: kind };
  try {
    if (kind === 'postgres') {
      dbName = `custos_bench_${randomBytes(6).toString('hex')}`;
      await adminQuery(`CREATE DATABASE ${dbName}`);
      await adminQuery(`CREATE DATABASE ${dbName}_audit`);
      env.CUSTOS_DATABASE_URL = withDatabase(pgAdminUrl!, dbName);
      env.CUSTOS_AUDIT_DATABASE_URL = withDatabase(pgAdminUrl!, `${dbName}_audit`);
      out.databases = [dbName, `${dbName}_audit`];
    }
    const port = await freePort();
    const serverEnv = cleanEnv({ ...env, CUSTOS_PORT: String(port) });

    // 1. Custos, every control on.
    log(`${kind}: starting Custos (data dir ${dataDir})`);
    const custos = await startCustos(serverEnv, logFile);
    children.push(custos);
    const creds = await custosInit(serverEnv);
    const client = new HttpClient(custos.url, Math.max(cfg.concurrency, cfg.importParallel) + 2);
    const tk = await tokenKeeper(client, creds);
    timers.push(tk);
    const token = tk.holder;
    const pid = custos.proc.pid;
    log(`${kind}: warm-up (${cfg.warmup} creates, ${cfg.warmup} reads; not measured)`);
    const warm = await createPhase(client, '', token, cfg.warmup, 1_000_000);
    if (warm.ids.length === 0 && cfg.warmup > 0)
      throw new Error(`warm-up creates failed: ${JSON.stringify(warm.result.statuses)}`);
    await readPhase(client, token, warm.ids, cfg.warmup, cfg.seed + 1);
    const create = await measurePhase(pid, 'create', () => createPhase(client, '', token, cfg.creates, 0));
    const ids = create.out.ids;
    const read = await measurePhase(pid, 'read', () =>
      readPhase(client, token, ids, cfg.reads, cfg.seed + 2),
    );
    const custosOut: Record<string, unknown> = {
      create: { ...create.out.result, cpuCores: create.cpu, cpuMsPerRequest: create.cpuMsPerRequest },
      read: { ...read.out, cpuCores: read.cpu, cpuMsPerRequest: read.cpuMsPerRequest },
    };
    if (typeof synthea === 'string') {
      custosOut.import = { skipped: synthea };
    } else {
      const foreignBefore = await waitForQuiet(pid);
      log(`  import: ${synthea.length} Synthea bundles, ${cfg.importParallel} in parallel…`);
      const a = cpuSnap(pid);
      const imp = await importPhase(client, token, synthea);
      const b = cpuSnap(pid);
      const cpu = cpuDelta(a, b);
      log(
        `  import: ${imp.resourcesPerSecond} resources/s, ${imp.bundlesOk}/${imp.bundles} bundles ok, bundle p50 ${imp.bundleLatencyMs.p50} ms, p99 ${imp.bundleLatencyMs.p99} ms, cpu ${JSON.stringify(cpu)}`,
      );
      custosOut.import = {
        ...imp,
        cpuCores: { ...cpu, foreignBefore },
        cpuMsPerResource: perRequest(a, b, imp.resources),
      };
    }
    tk.stop();
    client.close();
    if (custos.proc.exitCode !== null || custos.proc.signalCode !== null) {
      custosOut.serverExited = { code: custos.proc.exitCode, signal: custos.proc.signalCode };
    }
    await custos.stop();
    children.pop();
    custosOut.auditEntries = await auditSize(kind, env, dataDir);
    const logText = fs.readFileSync(logFile, 'utf8');
    custosOut.serverLog = {
      requestLines: (logText.match(/"event":"http\.request"/g) ?? []).length,
      errorLines: (logText.match(/"level":"error"/g) ?? []).length,
    };
    out.custos = custosOut;

    // 2. The bare baseline on the same table and driver.
    if (cfg.baseline && ids.length > 0) {
      log(`${kind}: starting the bare baseline server`);
      const bEnv = cleanEnv(
        kind === 'postgres'
          ? { BASELINE_DATABASE_URL: env.CUSTOS_DATABASE_URL!, BASELINE_PROJECT_ID: creds.projectId }
          : { BASELINE_PGLITE_DIR: path.join(dataDir, 'resources'), BASELINE_PROJECT_ID: creds.projectId },
      );
      const base = await startBaseline(bEnv, logFile);
      children.push(base);
      const bc = new HttpClient(base.url, cfg.concurrency + 2);
      const none = { value: 'none' };
      const bpid = base.proc.pid;
      await readPhase(bc, none, ids, cfg.warmup, cfg.seed + 1);
      await createPhase(bc, '', none, cfg.warmup, 2_000_000);
      const bread = await measurePhase(bpid, 'baseline read', () =>
        readPhase(bc, none, ids, cfg.reads, cfg.seed + 2),
      );
      const bcreate = await measurePhase(bpid, 'baseline create (1 INSERT)', () =>
        createPhase(bc, '', none, cfg.creates, 3_000_000),
      );
      const bver = await measurePhase(bpid, 'baseline create (versioned: 2 INSERTs in 1 transaction)', () =>
        createPhase(bc, '/versioned', none, cfg.creates, 4_000_000),
      );
      bc.close();
      await base.stop();
      children.pop();
      const ratio = (a: number, b: number) => (b > 0 ? Math.round((a / b) * 100) / 100 : null);
      out.baseline = {
        what: 'bare node:http server, no auth/purpose/validation/Provenance/audit/logging, same table and driver (bench/baseline-server.ts)',
        read: { ...bread.out, cpuCores: bread.cpu, cpuMsPerRequest: bread.cpuMsPerRequest },
        create: {
          ...bcreate.out.result,
          cpuCores: bcreate.cpu,
          cpuMsPerRequest: bcreate.cpuMsPerRequest,
          what: 'one INSERT INTO resource (autocommit)',
        },
        createVersioned: {
          ...bver.out.result,
          cpuCores: bver.cpu,
          cpuMsPerRequest: bver.cpuMsPerRequest,
          what: 'INSERT resource_version + INSERT resource in one transaction',
        },
      };
      // Server + PostgreSQL CPU per request: unlike throughput, barely affected by other load on the machine.
      const cpuMs = (c: { server: number | null; postgres: number | null }) =>
        (c.server ?? 0) + (c.postgres ?? 0);
      out.ratios = {
        readsBaselineOverCustos: ratio(bread.out.perSecond, read.out.perSecond),
        createsBaselineOverCustos: ratio(bcreate.out.result.perSecond, create.out.result.perSecond),
        createsVersionedBaselineOverCustos: ratio(bver.out.result.perSecond, create.out.result.perSecond),
        readCpuMsCustosOverBaseline: ratio(cpuMs(read.cpuMsPerRequest), cpuMs(bread.cpuMsPerRequest)),
        createCpuMsCustosOverBaseline: ratio(cpuMs(create.cpuMsPerRequest), cpuMs(bcreate.cpuMsPerRequest)),
      };
    }

    // 3. Profile: the same server under --cpu-prof, create and read phases cut out of one profile.
    if (cfg.profile && ids.length > 0) {
      const dir = path.join(profileRoot, kind);
      fs.mkdirSync(dir, { recursive: true });
      log(`${kind}: profiling Custos (--cpu-prof into ${dir})`);
      const prof = await startCustos(serverEnv, logFile, dir);
      children.push(prof);
      const pc = new HttpClient(prof.url, cfg.concurrency + 2);
      const ptk = await tokenKeeper(pc, creds);
      timers.push(ptk);
      const warmP = await createPhase(pc, '', ptk.holder, cfg.warmup, 5_000_000);
      await readPhase(pc, ptk.holder, warmP.ids, cfg.warmup, cfg.seed + 3);
      const pcreate = await measurePhase(prof.proc.pid, 'profiled create', () =>
        createPhase(pc, '', ptk.holder, cfg.profileCreates, 6_000_000),
      );
      const pread = await measurePhase(prof.proc.pid, 'profiled read', () =>
        readPhase(pc, ptk.holder, ids, cfg.profileReads, cfg.seed + 4),
      );
      let pimport: { perSecond: number; window: { from: number; to: number } } | undefined;
      if (typeof synthea !== 'string' && cfg.profileImportBundles > 0) {
        await waitForQuiet(prof.proc.pid);
        log(`  profiled import (${Math.min(cfg.profileImportBundles, synthea.length)} bundles)…`);
        const from = hr();
        const imp = await importPhase(pc, ptk.holder, synthea.slice(0, cfg.profileImportBundles));
        pimport = { perSecond: imp.resourcesPerSecond, window: { from, to: hr() } };
        log(`  profiled import: ${imp.resourcesPerSecond} resources/s`);
      }
      ptk.stop();
      pc.close();
      const ppid = prof.proc.pid;
      await prof.stop();
      children.pop();
      // One profile per thread; the main thread is <pid>.0.
      const file = fs.readdirSync(dir).find((f) => f.includes(`.${ppid}.0.`) && f.endsWith('.cpuprofile'));
      if (!file) {
        out.profile = { error: `no main-thread .cpuprofile for pid ${ppid} in ${dir}` };
      } else {
        const profile = readProfile(path.join(dir, file));
        const trim = (s: ProfileSummary) => ({
          ...s,
          byFile: s.byFile.slice(0, 12),
          inclusiveByPackage: s.inclusiveByPackage.slice(0, 12),
        });
        out.profile = {
          file: path.join(dir, file),
          note: 'separate run under --cpu-prof (throughput below is with the profiler on); self time of the server process only (PostgreSQL server time is not in it)',
          create: {
            perSecond: pcreate.out.result.perSecond,
            cpuCores: pcreate.cpu,
            ...trim(summarizeProfile(profile, pcreate.window)),
          },
          read: {
            perSecond: pread.out.perSecond,
            cpuCores: pread.cpu,
            ...trim(summarizeProfile(profile, pread.window)),
          },
          import: pimport && {
            resourcesPerSecond: pimport.perSecond,
            bundles: cfg.profileImportBundles,
            ...trim(summarizeProfile(profile, pimport.window)),
          },
        };
      }
    }
    failed = false;
    return out;
  } finally {
    for (const t of timers) t.stop();
    for (const c of children.reverse()) {
      if (failed && c.proc.exitCode !== null)
        log(`${kind}: a server child had exited with code ${c.proc.exitCode} (signal ${c.proc.signalCode})`);
      await c.stop().catch(() => {});
    }
    if (failed && fs.existsSync(logFile)) {
      const kept = path.join(profileRoot, `${kind}-server.log`);
      fs.copyFileSync(logFile, kept);
      log(`${kind}: server log kept in ${kept}`);
    }
    fs.rmSync(dataDir, { recursive: true, force: true });
    if (dbName) {
      await adminQuery(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`).catch((e: unknown) =>
        log(`drop ${dbName}: ${String(e)}`),
      );
      await adminQuery(`DROP DATABASE IF EXISTS ${dbName}_audit WITH (FORCE)`).catch((e: unknown) =>
        log(`drop ${dbName}_audit: ${String(e)}`),
      );
    }
  }
}

/** Entries in the audit log after the Custos run (every read is one, every write two). */
async function auditSize(
  kind: 'embedded' | 'postgres',
  env: Record<string, string>,
  dataDir: string,
): Promise<number | null> {
  try {
    if (kind === 'postgres') {
      const c = new pg.Client({ connectionString: env.CUSTOS_AUDIT_DATABASE_URL });
      await c.connect();
      try {
        return Number(
          (await c.query<{ n: string }>('SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_entry')).rows[0]
            ?.n ?? 0,
        );
      } finally {
        await c.end();
      }
    }
    const db = new PGlite(path.join(dataDir, 'audit'));
    try {
      return Number(
        (await db.query<{ n: string }>('SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_entry')).rows[0]
          ?.n ?? 0,
      );
    } finally {
      await db.close();
    }
  } catch {
    return null;
  }
}

async function machine() {
  const cpus = os.cpus();
  const pkg = (name: string) => {
    try {
      return (
        JSON.parse(fs.readFileSync(path.join(repoRoot, 'node_modules', name, 'package.json'), 'utf8')) as {
          version: string;
        }
      ).version;
    } catch {
      return undefined;
    }
  };
  const m: Record<string, unknown> = {
    cores: cpus.length,
    cpuModel: cpus[0]?.model,
    memoryGB: Math.round(os.totalmem() / 2 ** 30),
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    pglite: pkg('@electric-sql/pglite'),
    pg: pkg('pg'),
    fastify: pkg('fastify'),
    sharing: `the load generator (this process), the server child and PostgreSQL share the ${cpus.length} cores; see cpuCores per phase`,
  };
  if (pgAdminUrl) {
    try {
      const r = await adminQuery(
        `SELECT current_setting('server_version') AS version, current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit,
                current_setting('shared_buffers') AS shared_buffers, current_setting('wal_sync_method') AS wal_sync_method`,
      );
      m.postgres = r.rows[0];
    } catch (e) {
      m.postgres = { error: String(e) };
    }
  }
  return m;
}

function target(name: string, value: number | null | undefined, op: '>=' | '<=', limit: number) {
  const v = value ?? null;
  return {
    name,
    target: `${op} ${limit}`,
    value: v,
    pass: v === null ? null : op === '>=' ? v >= limit : v <= limit,
  };
}

async function main() {
  const started = new Date();
  const t0 = performance.now();
  let synthea: PreparedBundle[] | string;
  if (!cfg.import) synthea = 'disabled by --no-import';
  else if (!fs.existsSync(flags.synthea)) synthea = `skipped: ${flags.synthea} is absent`;
  else {
    log(`preparing Synthea bundles from ${flags.synthea} (adding HTEST labels)`);
    synthea = prepareSynthea(flags.synthea);
  }
  const result: Record<string, unknown> = {
    bench: 'custos-http',
    command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    startedAt: started.toISOString(),
    config: {
      ...cfg,
      phases:
        'warm-up (not measured), create, read, Synthea import; then the bare baseline; then a separate --cpu-prof run',
      server:
        'child process: node --import tsx src/cli/main.ts serve (CUSTOS_LOG_LEVEL=info, request log to a file)',
      client: 'this process: node:http keep-alive agent, closed loop, one socket per in-flight request',
      syntheaBundles: typeof synthea === 'string' ? synthea : synthea.length,
      syntheaResources: typeof synthea === 'string' ? undefined : synthea.reduce((a, b) => a + b.entries, 0),
    },
    machine: await machine(),
  };
  const storages: Record<string, unknown> = {};
  for (const kind of ['embedded', 'postgres'] as const) {
    if (!wanted.has(kind)) {
      storages[kind] = { skipped: 'not in --storage' };
      continue;
    }
    if (kind === 'postgres' && !pgAdminUrl) {
      storages[kind] = {
        skipped:
          'set CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres)',
      };
      continue;
    }
    try {
      storages[kind] = await benchStorage(kind, synthea);
    } catch (e) {
      log(`${kind}: FAILED: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      storages[kind] = { error: e instanceof Error ? e.message : String(e) };
    }
  }
  result.storages = storages;
  type S = {
    custos?: { read?: LoadResult; create?: LoadResult; import?: { resourcesPerSecond?: number } };
    ratios?: { readsBaselineOverCustos?: number | null };
  };
  const p = storages.postgres as S | undefined;
  result.targets = {
    storage: 'postgres (server PostgreSQL, every control on)',
    checks: [
      target('reads per second', p?.custos?.read?.perSecond, '>=', 2000),
      target('creates per second', p?.custos?.create?.perSecond, '>=', 500),
      target('bare-server reads/s ÷ Custos reads/s', p?.ratios?.readsBaselineOverCustos, '<=', 2.0),
      target('Synthea import resources per second', p?.custos?.import?.resourcesPerSecond, '>=', 1500),
    ],
  };
  result.profilesDir = cfg.profile ? profileRoot : undefined;
  result.totalSeconds = Math.round((performance.now() - t0) / 100) / 10;
  process.stdout.write(`${compactJson(result)}\n`);
}

/** JSON indented by two spaces, except that objects and arrays of primitives that fit in 140 characters stay on one line. */
function compactJson(value: unknown, indent = ''): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  const entries: [string | undefined, unknown][] = Array.isArray(value)
    ? value.map((v) => [undefined, v === undefined ? null : v])
    : Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
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

await main();
