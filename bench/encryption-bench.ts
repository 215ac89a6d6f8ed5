/**
 * Custos encryption benchmark: `npm run bench:encryption` (= node --import tsx bench/encryption-bench.ts [flags]).
 *
 * What does field-level encryption (docs/encryption.md) cost?
 *
 *   micro  in this process, ns per operation (median of --runs runs, each of about --run-ms):
 *          - node's AES-256-GCM per call (createCipheriv, setAAD, update, final, getAuthTag; and the
 *            decipher side) for 16 B, 64 B, 1 KiB and 16 KiB, randomBytes(12), HKDF-SHA-256 subkey;
 *          - Envelope.seal (static, as the gateway calls it) and Envelope.open on a real Envelope
 *            with an in-memory KeyProvider and an in-memory stand-in for its `data_key` queries
 *            (both defined here; keys are cached after the first unwrap, as in the server);
 *          - per resource (a Synthea Patient with SSN and narrative, a Condition, a survey
 *            Observation with a note added): the write-side work encryption adds (splitProtected,
 *            one seal per class, blind-index keys) against what the same write does without it
 *            (search index of the full resource), and the read-side work (the gateway's `reveal`:
 *            parse, open per class, restoreProtected, stringify), which is zero without encryption;
 *          - batching: a resource with N = 1, 4, 16 protected elements of one class sealed with one
 *            AEAD per element against one AEAD per class per resource (what the code does).
 *   http   two servers in the same run per storage (`src/cli/main.ts serve`, every control on):
 *          one default (encryption on), one with CUSTOS_ENCRYPTION=off (bench-only switch; production
 *          refuses it), each in a fresh data directory / fresh databases, driven phase by phase in
 *          alternating order (on/off, then off/on, …) so that both see the same machine:
 *            create-patient   POST Patient with an SSN identifier and a narrative (classes identifiers, notes)
 *            create-condition POST Condition (class diagnoses) for those patients
 *            read-patient / read-condition   GET by id
 *            search-ssn       GET Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-…
 *          Embedded PGlite always; PostgreSQL too when CUSTOS_BENCH_DATABASE_URL or
 *          CUSTOS_TEST_DATABASE_URL is set (databases custos_encbench_<hex>_{on,off}[_audit], dropped at the end).
 *          Then: every created resource read back; sealed rows counted; on PostgreSQL, transactions
 *          per request of each kind (pg_stat_database); the cost of the key statement writes ran
 *          before the epoch cache; and both servers profiled under --cpu-prof (bench/profile-summary.ts).
 *          Results and their reading: docs/bench.md, "Encryption benchmark".
 *
 * Test data is synthetic: family name Testpatient, given names like Zzyzx, SSNs 999-xx-xxxx, HTEST.
 * Prints ONE JSON document on stdout; progress goes to stderr.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import {
  createCipheriv,
  createDecipheriv,
  createHmac,
  hkdfSync,
  randomBytes,
  randomFillSync,
  type CipherGCM,
  type DecipherGCM,
} from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import pg from 'pg';
import { PGlite } from '@electric-sql/pglite';
import { freePort } from '../test/support/free-port.ts';
import {
  Envelope,
  blindIndexKey,
  hkdfSubkey,
  protectedIndexKeys,
  type SealContext,
} from '../src/crypto/envelope.ts';
import { ProtectedParams } from '../src/phi/minimum-necessary.ts';
import { KeyProviderError, type KeyProvider } from '../src/crypto/key-provider.ts';
import {
  defaultPolicy,
  restoreProtected,
  splitProtected,
  type ProtectedElement,
  type SensitivityClass,
} from '../src/crypto/protection-policy.ts';
import { extractSearchIndex } from '../src/fhir/search-index.ts';
import type { SqlDriver, SqlQueryable } from '../src/store/sql-driver.ts';
import { HttpClient, prng, runLoad, type LoadResult, type Reply } from './load.ts';
import { readProfile, summarizeProfile } from './profile-summary.ts';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };
const SSN_SYSTEM = 'http://hl7.org/fhir/sid/us-ssn';

const { values: flags } = parseArgs({
  options: {
    'no-micro': { type: 'boolean', default: false },
    'no-http': { type: 'boolean', default: false },
    runs: { type: 'string', default: '7' },
    'run-ms': { type: 'string', default: '150' },
    storage: { type: 'string', default: 'embedded,postgres' },
    rounds: { type: 'string', default: '6' },
    concurrency: { type: 'string', default: '16' },
    creates: { type: 'string', default: '600' },
    reads: { type: 'string', default: '2500' },
    searches: { type: 'string', default: '300' },
    'count-requests': { type: 'string', default: '200' },
    'no-profile': { type: 'boolean', default: false },
    'profile-requests': { type: 'string', default: '600' },
    warmup: { type: 'string', default: '200' },
    'max-phase-seconds': { type: 'string', default: '30' },
    'quiet-wait': { type: 'string', default: '10' },
    synthea: { type: 'string', default: path.join(repoRoot, '..', 'shared', 'data', 'synthea-r4') },
    seed: { type: 'string', default: '20240601' },
    'keep-data': { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
  allowPositionals: false,
});

if (flags.help) {
  process.stderr.write(`usage: npm run bench:encryption -- [--no-micro] [--no-http] [--runs 7] [--run-ms 150]
  [--storage embedded,postgres] [--rounds 6] [--concurrency 16] [--creates 600] [--reads 2500]
  [--searches 300] [--count-requests 200] [--no-profile] [--profile-requests 600] [--warmup 200] [--max-phase-seconds 30] [--quiet-wait 10] [--synthea DIR] [--seed N]
  [--keep-data] keep the embedded servers' data directories (their paths are logged) for EXPLAIN afterwards
Per round and server: --creates Patients, --creates Conditions, --reads reads of each, --searches SSN searches.
PostgreSQL runs when CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL is set.\n`);
  process.exit(0);
}

function int(name: string, v: string | undefined): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer`);
  return n;
}

const cfg = {
  micro: !flags['no-micro'],
  http: !flags['no-http'],
  runs: Math.max(1, int('runs', flags.runs)),
  runMs: Math.max(5, int('run-ms', flags['run-ms'])),
  rounds: Math.max(1, int('rounds', flags.rounds)),
  concurrency: Math.max(1, int('concurrency', flags.concurrency)),
  creates: Math.max(1, int('creates', flags.creates)),
  reads: int('reads', flags.reads),
  searches: int('searches', flags.searches),
  countRequests: int('count-requests', flags['count-requests']),
  profile: !flags['no-profile'],
  profileRequests: Math.max(1, int('profile-requests', flags['profile-requests'])),
  warmup: int('warmup', flags.warmup),
  maxPhaseSeconds: Math.max(1, int('max-phase-seconds', flags['max-phase-seconds'])),
  quietWait: int('quiet-wait', flags['quiet-wait']),
  seed: int('seed', flags.seed),
};
const pgAdminUrl = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL || undefined;
const wanted = new Set(flags.storage.split(',').map((s) => s.trim()));

const log = (s: string) =>
  process.stderr.write(`[enc-bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);
const loadavg = () => os.loadavg().map((x) => Math.round(x * 100) / 100);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;
const median = (xs: number[]) => {
  const a = [...xs].sort((x, y) => x - y);
  if (a.length === 0) return NaN;
  const m = a.length >> 1;
  return a.length % 2 ? a[m]! : (a[m - 1]! + a[m]!) / 2;
};

// ================================================================================================
// micro
// ================================================================================================

let sink = 0; // results feed this so that no measured work can be optimized away

interface MicroResult {
  /** Median over the runs of this process's CPU time per operation (user + system, all threads). */
  nsPerOp: number;
  min: number;
  max: number;
  /** Median wall-clock time per operation (inflated when other processes take the cores). */
  wallNsPerOp: number;
  itersPerRun: number;
  runs: number;
}

const cpuNs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) * 1000;
};

function summarizeRuns(cpu: number[], wall: number[], iters: number): MicroResult {
  return {
    nsPerOp: round(median(cpu)),
    min: round(Math.min(...cpu)),
    max: round(Math.max(...cpu)),
    wallNsPerOp: round(median(wall)),
    itersPerRun: iters,
    runs: cfg.runs,
  };
}

/**
 * Warms up for about 50 ms, calibrates an iteration count for about --run-ms, then takes --runs
 * runs. CPU time is the measure: on this shared machine other processes take the cores for whole
 * time slices, which inflates wall-clock time but not the CPU time the operation uses.
 */
function bench(fn: () => unknown): MicroResult {
  const warm = performance.now() + 50;
  for (let i = 0; i < 3 || performance.now() < warm; i++) sinkOf(fn());
  let iters = 1;
  for (;;) {
    const t0 = cpuNs();
    for (let i = 0; i < iters; i++) sinkOf(fn());
    const ms = (cpuNs() - t0) / 1e6;
    if (ms >= 20) {
      iters = Math.max(1, Math.round((iters * cfg.runMs) / ms));
      break;
    }
    iters *= 2;
  }
  const cpu: number[] = [];
  const wall: number[] = [];
  for (let r = 0; r < cfg.runs; r++) {
    const w0 = process.hrtime.bigint();
    const c0 = cpuNs();
    for (let i = 0; i < iters; i++) sinkOf(fn());
    cpu.push((cpuNs() - c0) / iters);
    wall.push(Number(process.hrtime.bigint() - w0) / iters);
  }
  return summarizeRuns(cpu, wall, iters);
}

async function benchAsync(fn: () => Promise<unknown>): Promise<MicroResult> {
  const warm = performance.now() + 50;
  for (let i = 0; i < 3 || performance.now() < warm; i++) sinkOf(await fn());
  let iters = 1;
  for (;;) {
    const t0 = cpuNs();
    for (let i = 0; i < iters; i++) sinkOf(await fn());
    const ms = (cpuNs() - t0) / 1e6;
    if (ms >= 20) {
      iters = Math.max(1, Math.round((iters * cfg.runMs) / ms));
      break;
    }
    iters *= 2;
  }
  const cpu: number[] = [];
  const wall: number[] = [];
  for (let r = 0; r < cfg.runs; r++) {
    const w0 = process.hrtime.bigint();
    const c0 = cpuNs();
    for (let i = 0; i < iters; i++) sinkOf(await fn());
    cpu.push((cpuNs() - c0) / iters);
    wall.push(Number(process.hrtime.bigint() - w0) / iters);
  }
  return summarizeRuns(cpu, wall, iters);
}

function sinkOf(v: unknown): void {
  if (typeof v === 'string' || Buffer.isBuffer(v)) sink += v.length;
  else if (typeof v === 'number') sink += v;
  else if (v && typeof v === 'object') sink += 1;
}

/** The key provider port, in memory (bench only): each KEK is 32 random bytes, wraps are AES-256-GCM. */
class MemoryKeyProvider implements KeyProvider {
  readonly kind = 'local' as const;
  private readonly keks = new Map<string, Buffer>();
  unwraps = 0;
  async createKek(keyId: string): Promise<string> {
    const handle = `mem:${keyId}:${randomBytes(4).toString('hex')}`;
    this.keks.set(handle, randomBytes(32));
    return handle;
  }
  async wrap(handle: string, dataKey: Buffer, aad: Buffer): Promise<Buffer> {
    const kek = this.keks.get(handle);
    if (!kek) throw new KeyProviderError('unknown_key', 'unknown KEK');
    const iv = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', kek, iv);
    c.setAAD(aad);
    return Buffer.concat([iv, c.update(dataKey), c.final(), c.getAuthTag()]);
  }
  async unwrap(handle: string, wrapped: Buffer, aad: Buffer): Promise<Buffer> {
    const kek = this.keks.get(handle);
    if (!kek) throw new KeyProviderError('unknown_key', 'unknown KEK');
    this.unwraps++;
    try {
      const d = createDecipheriv('aes-256-gcm', kek, wrapped.subarray(0, 12));
      d.setAAD(aad);
      d.setAuthTag(wrapped.subarray(wrapped.length - 16));
      return Buffer.concat([d.update(wrapped.subarray(12, wrapped.length - 16)), d.final()]);
    } catch {
      throw new KeyProviderError('integrity', 'unwrap failed');
    }
  }
  async destroyKek(handle: string): Promise<void> {
    this.keks.delete(handle);
  }
  async close(): Promise<void> {}
}

/**
 * An in-memory stand-in for the `data_key` queries Envelope makes (bench only). It answers exactly
 * the statements of src/crypto/envelope.ts and fails loudly on anything else.
 */
class MemoryKeyDb implements SqlDriver {
  readonly kind = 'embedded' as const;
  private readonly rows: {
    project_id: string;
    kind: string;
    epoch: number;
    kek_handle: string;
    wrapped: Buffer;
    state: string;
  }[] = [];
  async query<R = Record<string, unknown>>(
    sql: string,
    params: readonly unknown[] = [],
  ): Promise<{ rows: R[] }> {
    const s = sql.replace(/\s+/g, ' ').trim();
    const [projectId, kind, epoch] = params as [string, string, number];
    if (s.startsWith('SELECT max(epoch) AS epoch FROM data_key')) {
      const active = s.includes("state = 'active'");
      const es = this.rows
        .filter((r) => r.project_id === projectId && r.kind === 'data' && (!active || r.state === 'active'))
        .map((r) => r.epoch);
      return { rows: [{ epoch: es.length ? Math.max(...es) : null }] as R[] };
    }
    if (s.startsWith("SELECT 1 FROM data_key WHERE project_id = $1 AND kind = 'blind'")) {
      return {
        rows: this.rows.filter((r) => r.project_id === projectId && r.kind === 'blind').map(() => ({}) as R),
      };
    }
    if (s.startsWith('INSERT INTO data_key')) {
      const p = params as [string, string, number, string, string, Buffer];
      this.rows.push({
        project_id: p[0],
        kind: p[1],
        epoch: p[2],
        kek_handle: p[4],
        wrapped: p[5],
        state: 'active',
      });
      return { rows: [] };
    }
    if (s.startsWith('SELECT kek_handle, wrapped, state FROM data_key')) {
      return {
        rows: this.rows
          .filter((r) => r.project_id === projectId && r.kind === kind && r.epoch === epoch)
          .map((r) => ({ kek_handle: r.kek_handle, wrapped: r.wrapped, state: r.state }) as R),
      };
    }
    throw new Error(`MemoryKeyDb: unexpected SQL: ${s}`);
  }
  transaction<T>(fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return fn(this);
  }
  lockedTransaction<T>(_key: string, fn: (tx: SqlQueryable) => Promise<T>): Promise<T> {
    return fn(this);
  }
  async close(): Promise<void> {}
}

type Json = Record<string, unknown>;

/** A Patient, a Condition and a survey Observation from the first Synthea bundle, made obviously fake. */
function realisticResources(dir: string): { source: string; resources: Record<string, Json> } {
  let bundle: { entry?: { resource?: Json }[] } | undefined;
  let source = 'built in (Synthea directory absent)';
  if (fs.existsSync(dir)) {
    const file = fs
      .readdirSync(dir)
      .filter((f) => f.endsWith('.json'))
      .sort()[0];
    if (file) {
      bundle = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')) as typeof bundle;
      source = `first Synthea bundle of ${dir} (by name)`;
    }
  }
  const all = (bundle?.entry ?? []).map((e) => e.resource).filter((r): r is Json => !!r);
  const find = (t: string, pred: (r: Json) => boolean = () => true) =>
    structuredClone(all.find((r) => r.resourceType === t && pred(r)));
  const patient: Json = find('Patient') ?? { resourceType: 'Patient', id: 'p1', identifier: [] };
  // Obviously fake names; SSN 999-xx-xxxx (Synthea's are 999- already); a narrative.
  patient.name = [{ use: 'official', family: 'Testpatient', given: ['Zzyzx'], prefix: ['Mx.'] }];
  const ids = (patient.identifier as Json[] | undefined) ?? [];
  const ssn = ids.find((i) => i.system === SSN_SYSTEM);
  if (ssn) ssn.value = '999-12-3456';
  else ids.push({ system: SSN_SYSTEM, value: '999-12-3456' });
  patient.identifier = ids;
  patient.text ??= {
    status: 'generated',
    div: '<div xmlns="http://www.w3.org/1999/xhtml">Testpatient Zzyzx</div>',
  };
  patient.meta = { security: [HTEST] };
  const condition: Json = find('Condition') ?? {
    resourceType: 'Condition',
    id: 'c1',
    code: {
      coding: [{ system: 'http://snomed.info/sct', code: '162864005', display: 'Body mass index 30+' }],
    },
    subject: { reference: 'Patient/p1' },
  };
  condition.meta = { security: [HTEST] };
  const isSensitive = (r: Json) =>
    JSON.stringify(r.category ?? '').includes('"survey"') ||
    JSON.stringify(r.category ?? '').includes('"social-history"');
  const observation: Json = find('Observation', isSensitive) ?? {
    resourceType: 'Observation',
    id: 'o1',
    status: 'final',
    category: [
      { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'survey' }] },
    ],
    code: { coding: [{ system: 'http://loinc.org', code: '72166-2' }] },
    valueCodeableConcept: { coding: [{ system: 'http://snomed.info/sct', code: '266919005' }] },
  };
  observation.note = [
    {
      text: 'Synthetic test note for Testpatient Zzyzx: patient reports no tobacco use; counselled on screening. Not real data.',
    },
  ];
  observation.meta = { security: [HTEST] };
  return { source, resources: { Patient: patient, Condition: condition, Observation: observation } };
}

async function micro() {
  const out: Record<string, unknown> = {};
  const key = randomBytes(32);
  const aadBuf = Buffer.from(
    'custos:seal:v1|00000000-0000-0000-0000-000000000000|Patient|0123456789abcdef|1|identifiers',
  );
  const nonce = randomBytes(12);

  // 1. Node's AES-256-GCM per call.
  const aes: Record<string, unknown> = {};
  for (const size of [16, 64, 1024, 16384]) {
    const pt = randomBytes(size);
    const enc = () => {
      const c = createCipheriv('aes-256-gcm', key, nonce) as CipherGCM;
      c.setAAD(aadBuf);
      return Buffer.concat([c.update(pt), c.final(), c.getAuthTag()]);
    };
    const ct = enc();
    const body = ct.subarray(0, size);
    const tag = ct.subarray(size);
    const dec = () => {
      const d = createDecipheriv('aes-256-gcm', key, nonce) as DecipherGCM;
      d.setAAD(aadBuf);
      d.setAuthTag(tag);
      return Buffer.concat([d.update(body), d.final()]);
    };
    log(`micro: AES-256-GCM ${size} B…`);
    const e = bench(enc);
    const d = bench(dec);
    aes[`${size}B`] = {
      encrypt: e,
      decrypt: d,
      encryptMBps: round(size / 1e6 / (e.nsPerOp / 1e9), 1),
    };
  }
  out.aesGcm = {
    what: 'one call = createCipheriv + setAAD (91 B) + update + final + getAuthTag (+ Buffer.concat); decrypt = createDecipheriv + setAAD + setAuthTag + update + final',
    ...aes,
  };
  const info = aadBuf;
  // HKDF-SHA-256 with an empty salt and a 32-byte output, written as its two HMACs (RFC 5869):
  // PRK = HMAC(zeros(32), IKM), OKM = HMAC(PRK, info || 0x01). Same bytes as hkdfSync. Envelope's
  // hkdfSubkey is this with the PRK computed once per data key.
  const zeroSalt = Buffer.alloc(32);
  const one = Buffer.from([1]);
  const hkdfByHmac = (ikm: Buffer, inf: Buffer) =>
    createHmac('sha256', createHmac('sha256', zeroSalt).update(ikm).digest())
      .update(inf)
      .update(one)
      .digest();
  const hkdfRef = Buffer.from(hkdfSync('sha256', key, Buffer.alloc(0), info, 32));
  const hkdfSame = hkdfByHmac(key, info).equals(hkdfRef);
  const hkdfSubkeySame = hkdfSubkey(key, info).equals(hkdfRef);
  // Nonces sliced from a pooled randomFillSync buffer (each slice used once).
  const pool = Buffer.alloc(4096);
  let poolAt = pool.length;
  const pooledNonce = () => {
    if (poolAt + 12 > pool.length) {
      randomFillSync(pool);
      poolAt = 0;
    }
    poolAt += 12;
    return Buffer.from(pool.subarray(poolAt - 12, poolAt));
  };
  out.primitives = {
    'randomBytes(12)': bench(() => randomBytes(12)),
    'nonce from a 4 KiB randomFillSync pool (alternative)': bench(pooledNonce),
    'hkdfSync sha256 32 B (before)': bench(() => hkdfSync('sha256', key, Buffer.alloc(0), info, 32)),
    'HKDF as 2 createHmac (same output)': bench(() => hkdfByHmac(key, info)),
    'hkdfSubkey: HKDF with the PRK cached per data key (Envelope now)': bench(() => hkdfSubkey(key, info)),
    hkdfByHmacEqualsHkdfSync: hkdfSame,
    hkdfSubkeyEqualsHkdfSync: hkdfSubkeySame,
    'HMAC-SHA-256 (blind index key)': bench(() =>
      createHmac('sha256', key)
        .update('identifier=http://hl7.org/fhir/sid/us-ssn|999-12-3456', 'utf8')
        .digest(),
    ),
  };

  // 2. Envelope.seal / open on a real Envelope.
  const provider = new MemoryKeyProvider();
  const db = new MemoryKeyDb();
  let unwrapEvents = 0;
  const envelope = new Envelope({
    db,
    provider,
    onUnwrap: async () => {
      unwrapEvents++;
    },
  });
  const projectId = '00000000-0000-4000-8000-0000000000aa';
  // Copies, as before the fix of the eviction (dropped keys are no longer zeroed): harmless.
  const cached = await envelope.prepareWrite(projectId);
  const keys = { epoch: cached.epoch, dek: Buffer.from(cached.dek), blindKey: Buffer.from(cached.blindKey) };
  const ctx: SealContext = {
    projectId,
    type: 'Patient',
    id: 'bench-0123456789',
    version: 1,
    cls: 'identifiers',
  };
  const envOut: Record<string, unknown> = {};
  // Envelope.seal and open as they were before (hkdfSync per call, randomBytes(12) per nonce): the
  // baseline of this run. Same format and keys: each opens what the other seals.
  const infoOf = (c: SealContext) =>
    Buffer.from(`custos:seal:v1|${c.projectId}|${c.type}|${c.id}|${c.version}|${c.cls}`, 'utf8');
  const sealPrevious = (dek: Buffer, epoch: number, c: SealContext, plaintext: Buffer) => {
    const inf = infoOf(c);
    const subkey = Buffer.from(hkdfSync('sha256', dek, Buffer.alloc(0), inf, 32));
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', subkey, iv);
    cipher.setAAD(inf);
    const ct = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
    subkey.fill(0);
    return `v1.${epoch}.${iv.toString('base64url')}.${ct.toString('base64url')}`;
  };
  const openPrevious = async (c: SealContext, blob: string) => {
    const m = /^v1\.(\d{1,9})\.([A-Za-z0-9_-]{16})\.([A-Za-z0-9_-]{22,})$/.exec(blob)!;
    const dek = keys.dek; // served from the Envelope's cache in the server, as in `open`
    await Promise.resolve();
    const inf = infoOf(c);
    const subkey = Buffer.from(hkdfSync('sha256', dek, Buffer.alloc(0), inf, 32));
    const body = Buffer.from(m[3]!, 'base64url');
    const d = createDecipheriv('aes-256-gcm', subkey, Buffer.from(m[2]!, 'base64url'));
    d.setAAD(inf);
    d.setAuthTag(body.subarray(body.length - 16));
    const out = Buffer.concat([d.update(body.subarray(0, body.length - 16)), d.final()]);
    subkey.fill(0);
    return out;
  };
  for (const size of [16, 64, 1024, 16384]) {
    const pt = Buffer.from('x'.repeat(size));
    const blob = Envelope.seal(keys.dek, keys.epoch, ctx, pt);
    log(`micro: Envelope seal/open ${size} B…`);
    const prev = sealPrevious(keys.dek, keys.epoch, ctx, pt);
    const compatible =
      (await envelope.open(ctx, prev)).equals(pt) && (await openPrevious(ctx, blob)).equals(pt);
    envOut[`${size}B`] = {
      seal: bench(() => Envelope.seal(keys.dek, keys.epoch, ctx, pt)),
      sealPrevious: bench(() => sealPrevious(keys.dek, keys.epoch, ctx, pt)),
      open: await benchAsync(() => envelope.open(ctx, blob)),
      openPrevious: await benchAsync(() => openPrevious(ctx, blob)),
      previousAndNowOpenEachOther: compatible,
      sealedChars: blob.length,
    };
  }
  out.envelope = {
    what: 'Envelope.seal (static: HKDF subkey with the PRK cached per data key + pooled nonce + AES-256-GCM + base64url) and Envelope.open on a real Envelope (parse, cached DEK, HKDF, AES-256-GCM) with an in-memory KeyProvider and an in-memory data_key stand-in defined in this file; the DEK is unwrapped once and then cached, as in the server. sealPrevious/openPrevious: the construction before this change (hkdfSync per call, randomBytes(12)); same format, checked to open each other',
    ...envOut,
    providerUnwraps: provider.unwraps,
    onUnwrapEvents: unwrapEvents,
  };
  // prepareWrite: the cached epoch and two cached keys (no query in the steady state; before, one SQL
  // statement per write, answered here in memory).
  out.prepareWriteInMemory = await benchAsync(() => envelope.prepareWrite(projectId));

  // 3. Per resource.
  const policy = defaultPolicy();
  const params = new ProtectedParams(policy);
  const { source, resources } = realisticResources(flags.synthea);
  const perResource: Record<string, unknown> = {};
  for (const [type, resource] of Object.entries(resources)) {
    log(`micro: ${type} write/read paths…`);
    const id = String(resource.id);
    const base = { projectId, type, id, version: 1 };
    const sealAll = (split: ReturnType<typeof splitProtected>) =>
      Object.fromEntries(
        [...split.byClass].map(([cls, els]) => [
          cls,
          Envelope.seal(keys.dek, keys.epoch, { ...base, cls }, Buffer.from(JSON.stringify(els), 'utf8')),
        ]),
      );
    const isProtected = (code: string) => params.classOf(type, code) !== undefined;
    // What storeWrite does with encryption on (src/phi/gateway.ts storeWrite), and with it off.
    const writeOn = () => {
      const split = splitProtected(resource, policy);
      const sealed = sealAll(split);
      const index = extractSearchIndex(split.byClass.size ? split.redacted : resource);
      const set = new Set(index.keys);
      if (split.projection) {
        for (const k of protectedIndexKeys(
          extractSearchIndex(split.projection).keys,
          isProtected,
          keys.blindKey,
          envelope.blindBits,
        ))
          set.add(k);
      }
      return [sealed, set.size];
    };
    const writeOff = () => extractSearchIndex(resource).keys.length;
    const split = splitProtected(resource, policy);
    const projectionKeys = split.projection ? extractSearchIndex(split.projection).keys : [];
    // Before: every key of the projection's index, blinded (or kept, for presence keys).
    const blindKeysPrevious = () => {
      let n = 0;
      for (const k of projectionKeys)
        if (!k.endsWith('?')) n += blindIndexKey(keys.blindKey, envelope.blindBits, k).length;
      return n;
    };
    const blindKeysNow = () =>
      protectedIndexKeys(projectionKeys, isProtected, keys.blindKey, envelope.blindBits).length;
    const projectionIndex = () => extractSearchIndex(split.projection!).keys.length;
    const redactedIndex = () => extractSearchIndex(split.redacted).keys.length;
    const sealed = sealAll(split);
    const storedJson = JSON.stringify(split.redacted);
    // What reveal does on a read with encryption on (src/phi/gateway.ts reveal); off, it returns at once.
    const reveal = async () => {
      const r = JSON.parse(storedJson) as Json;
      for (const [cls, blob] of Object.entries(sealed)) {
        const c = { ...base, cls: cls as SensitivityClass };
        const plain = envelope.openCached(c, blob) ?? (await envelope.open(c, blob));
        restoreProtected(r, JSON.parse(plain.toString('utf8')) as ProtectedElement[]);
      }
      return JSON.stringify(r);
    };
    // The response of a write: before, `reveal` (re-opening what was just sealed); now restored from
    // the plaintext the write holds.
    const writeResponse = () => {
      const r = JSON.parse(storedJson) as Json;
      for (const els of split.byClass.values()) restoreProtected(r, els);
      return JSON.stringify(r);
    };
    // Check the round trip once.
    const back = JSON.parse(await reveal()) as Json;
    const roundTrip = JSON.stringify(back) === JSON.stringify(resource);
    const seals = () => sealAll(split);
    const singleAead = () =>
      Envelope.seal(
        keys.dek,
        keys.epoch,
        { ...base, cls: 'notes' },
        Buffer.from(JSON.stringify(Object.fromEntries(split.byClass)), 'utf8'),
      );
    const r = {
      jsonBytes: JSON.stringify(resource).length,
      classes: Object.fromEntries([...split.byClass].map(([c, els]) => [c, els.length])),
      sealedChars: Object.values(sealed).reduce((a, b) => a + b.length, 0),
      roundTripExact: roundTrip,
      splitProtected: bench(() => splitProtected(resource, policy)),
      sealPerClass: bench(seals),
      searchIndexOfRedacted: bench(redactedIndex),
      searchIndexOfProjection: split.projection ? bench(projectionIndex) : undefined,
      projectionIndexKeys: split.projection ? projectionKeys : undefined,
      blindKeysPrevious: split.projection ? bench(blindKeysPrevious) : undefined,
      blindKeysNow: split.projection ? bench(blindKeysNow) : undefined,
      storedBlindKeysNow: protectedIndexKeys(projectionKeys, isProtected, keys.blindKey, envelope.blindBits)
        .length,
      writeEncryptionOn: bench(writeOn),
      writeEncryptionOff: bench(writeOff),
      readReveal: await benchAsync(reveal),
      writeResponsePrevious: await benchAsync(reveal),
      writeResponseNow: bench(writeResponse),
      hypotheticalOneAeadPerResource: split.byClass.size > 1 ? bench(singleAead) : undefined,
    };
    perResource[type] = {
      ...r,
      addedWriteNs: round(r.writeEncryptionOn.nsPerOp - r.writeEncryptionOff.nsPerOp),
      addedReadNs: r.readReveal.nsPerOp,
    };
  }
  out.perResource = {
    source,
    what: {
      splitProtected: 'splitProtected(resource, defaultPolicy())',
      sealPerClass:
        'Envelope.seal of JSON.stringify(elements) for each class (one AEAD per class per resource)',
      writeEncryptionOn:
        'splitProtected + sealPerClass + extractSearchIndex(redacted) + extractSearchIndex(projection) + protectedIndexKeys: what storeWrite does with encryption on',
      writeEncryptionOff: 'extractSearchIndex(resource): what storeWrite does with encryption off',
      searchIndexOfRedacted: 'extractSearchIndex(redacted) (part of writeEncryptionOn)',
      searchIndexOfProjection:
        'extractSearchIndex(projection): every search parameter of the type over the protected elements (part of writeEncryptionOn)',
      blindKeysPrevious: 'before: blindIndexKey (HMAC-SHA-256) for every exact key of the projection index',
      blindKeysNow:
        'protectedIndexKeys: blind keys for the protected parameters only (part of writeEncryptionOn)',
      readReveal:
        "the gateway's reveal: JSON.parse(stored) + Envelope.openCached (open on a cache miss) per class + JSON.parse + restoreProtected + JSON.stringify (encryption off: nothing)",
      writeResponsePrevious: 'before: a write response was revealed like a read (readReveal)',
      writeResponseNow:
        'now: JSON.parse(stored) + restoreProtected from the plaintext the write holds + JSON.stringify (all classes visible)',
      hypotheticalOneAeadPerResource:
        'all classes in one AEAD (not what the code does; per-class keys would be lost)',
      addedWriteNs: 'writeEncryptionOn − writeEncryptionOff',
      addedReadNs: 'readReveal',
    },
    ...perResource,
  };

  // 4. Batching: N protected elements of one class, one AEAD per element vs one per class.
  const batching: Record<string, unknown> = {};
  for (const n of [1, 4, 16]) {
    log(`micro: batching N=${n}…`);
    const resource: Json = {
      resourceType: 'Condition',
      id: 'bench-batch',
      meta: { security: [HTEST] },
      code: { text: 'placeholder' },
      subject: { reference: 'Patient/bench' },
      note: Array.from({ length: n }, (_, i) => ({
        text: `Synthetic note ${i} for Testpatient Zzyzx: follow-up in two weeks, no real data here.`,
      })),
    };
    const split = splitProtected(resource, policy);
    const els = split.byClass.get('notes') ?? [];
    const base = { projectId, type: 'Condition', id: 'bench-batch', version: 1 };
    // One AEAD per element: each element its own subkey (info names the element) and nonce.
    const perElement = () =>
      els.map((el, i) =>
        Envelope.seal(
          keys.dek,
          keys.epoch,
          { ...base, cls: `notes#${i}` as SensitivityClass },
          Buffer.from(JSON.stringify([el]), 'utf8'),
        ),
      );
    const perClass = () =>
      Envelope.seal(
        keys.dek,
        keys.epoch,
        { ...base, cls: 'notes' },
        Buffer.from(JSON.stringify(els), 'utf8'),
      );
    const blobsE = perElement();
    const blobC = perClass();
    const openE = async () => {
      const out: ProtectedElement[] = [];
      for (let i = 0; i < blobsE.length; i++)
        out.push(
          ...(JSON.parse(
            (await envelope.open({ ...base, cls: `notes#${i}` as SensitivityClass }, blobsE[i]!)).toString(
              'utf8',
            ),
          ) as ProtectedElement[]),
        );
      return out.length;
    };
    const openC = async () =>
      (
        JSON.parse(
          (await envelope.open({ ...base, cls: 'notes' }, blobC)).toString('utf8'),
        ) as ProtectedElement[]
      ).length;
    const sE = bench(perElement);
    const sC = bench(perClass);
    const oE = await benchAsync(openE);
    const oC = await benchAsync(openC);
    batching[`N=${n}`] = {
      elements: els.length,
      sealOneAeadPerElement: sE,
      sealOneAeadPerClass: sC,
      openOneAeadPerElement: oE,
      openOneAeadPerClass: oC,
      sealSavedNs: round(sE.nsPerOp - sC.nsPerOp),
      openSavedNs: round(oE.nsPerOp - oC.nsPerOp),
      sealSpeedup: round(sE.nsPerOp / sC.nsPerOp, 2),
      openSpeedup: round(oE.nsPerOp / oC.nsPerOp, 2),
      storedChars: { perElement: blobsE.reduce((a, b) => a + b.length, 0), perClass: blobC.length },
    };
  }
  out.batching = {
    what: 'a Condition with N note texts (class notes); per element: N × Envelope.seal/open of one element, each under its own HKDF subkey and nonce (stored as N blobs); per class: one Envelope.seal/open of all N (what the code does). Both include JSON (de)serialization of the elements.',
    ...batching,
  };
  return out;
}

// ================================================================================================
// http
// ================================================================================================

interface CpuSnap {
  at: number;
  machineBusy: number;
  machineTotal: number;
  server: number;
  client: number;
  postgres: Map<number, number>;
}
const TICK = 100; // USER_HZ

function procTicks(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

/**
 * CPU ticks per PostgreSQL process: the auxiliary processes (walwriter, checkpointer, …) and the
 * backends connected to one of `dbs` (the measured server's databases); backends of other
 * databases (other sessions on this shared PostgreSQL) are left out.
 */
function postgresTicks(dbs: readonly string[]): Map<number, number> {
  const out = new Map<number, number>();
  if (dbs.length === 0) return out;
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
      const title = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
      const backend = /^postgres: [^:]+: \S+ (\S+) (?:[^\s(]*\(\d+\)|\[local\])/.exec(title);
      if (backend && !dbs.includes(backend[1]!)) continue;
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(Number(d), Number(f[11]) + Number(f[12]));
    } catch {
      /* exited */
    }
  }
  return out;
}

/** Ticks spent between two snapshots by the processes alive at the second (new ones count in full). */
function ticksBetween(a: Map<number, number>, b: Map<number, number>): number {
  let sum = 0;
  for (const [pid, t] of b) sum += Math.max(0, t - (a.get(pid) ?? 0));
  return sum;
}

function cpuSnap(serverPid: number | undefined, dbs: readonly string[] = []): CpuSnap {
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
    postgres: postgresTicks(dbs),
  };
}

function cpuDelta(a: CpuSnap, b: CpuSnap) {
  const seconds = (b.at - a.at) / 1000;
  const cores = (ticks: number) => round(ticks / TICK / seconds, 2);
  const machineCores = os.cpus().length;
  const busyShare =
    b.machineTotal > a.machineTotal ? (b.machineBusy - a.machineBusy) / (b.machineTotal - a.machineTotal) : 0;
  const busy = round(busyShare * machineCores, 2);
  const server = cores(b.server - a.server);
  const client = cores(b.client - a.client);
  const postgres = cores(ticksBetween(a.postgres, b.postgres));
  return { busy, server, client, postgres, other: Math.max(0, round(busy - server - client - postgres, 2)) };
}

async function waitForQuiet(): Promise<number> {
  const deadline = performance.now() + cfg.quietWait * 1000;
  for (;;) {
    const a = cpuSnap(undefined);
    await new Promise((r) => setTimeout(r, 1000));
    const d = cpuDelta(a, cpuSnap(undefined));
    const foreign = round(d.busy - d.client, 2); // our servers and PostgreSQL are idle between phases
    if (foreign <= 0.25 || performance.now() > deadline) {
      if (foreign > 0.25) log(`  machine still busy (${foreign} cores used by others); measuring anyway`);
      return foreign;
    }
    log(`  waiting for the machine to be quiet (${foreign} cores used by others)…`);
  }
}

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

function startCustos(env: NodeJS.ProcessEnv, logFile: string, nodeArgs: string[] = []): Promise<Child> {
  return new Promise((resolve, reject) => {
    const logFd = fs.openSync(logFile, 'a');
    const proc = spawn(process.execPath, [...nodeArgs, '--import', 'tsx', 'src/cli/main.ts', 'serve'], {
      cwd: repoRoot,
      env,
      stdio: ['ignore', logFd, 'pipe'],
    });
    let err = '';
    let done = false;
    let stopped = false;
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      proc.kill('SIGKILL');
      reject(new Error(`server did not start in 90 s: ${err.slice(-2000)}`));
    }, 90_000);
    proc.stderr!.on('data', (c: Buffer) => {
      fs.writeSync(logFd, c);
      if (done) return;
      err += c.toString();
      const url = /listening on (\S+?)\)/.exec(err)?.[1];
      if (!url) return;
      done = true;
      clearTimeout(timer);
      resolve({
        proc,
        url,
        async stop() {
          if (stopped) return;
          stopped = true;
          if (proc.exitCode === null && proc.signalCode === null) {
            proc.kill('SIGTERM');
            await new Promise<void>((r) => {
              const t = setTimeout(() => {
                proc.kill('SIGKILL');
                r();
              }, 30_000);
              proc.once('exit', () => {
                clearTimeout(t);
                r();
              });
            });
          }
          fs.closeSync(logFd);
        },
      });
    });
    proc.once('exit', (code) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before it was ready: ${err.slice(-2000)}`));
    });
  });
}

async function custosInit(env: NodeJS.ProcessEnv): Promise<{ clientId: string; clientSecret: string }> {
  const { stdout } = await promisify(execFile)(
    process.execPath,
    ['--import', 'tsx', 'src/cli/main.ts', 'init', '--json'],
    { cwd: repoRoot, env },
  );
  const r = JSON.parse(stdout) as { clientId: string; clientSecret?: string };
  if (!r.clientSecret) throw new Error('custos init returned no client secret (data directory not fresh?)');
  return { clientId: r.clientId, clientSecret: r.clientSecret };
}

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

function fhirHeaders(token: { value: string }, body: boolean): Record<string, string> {
  const h: Record<string, string> = {
    authorization: `Bearer ${token.value}`,
    'x-purpose-of-use': 'TREAT',
    accept: 'application/fhir+json',
  };
  if (body) h['content-type'] = 'application/fhir+json';
  return h;
}

const GIVEN = ['Zzyzx', 'Qwerty', 'Testina', 'Fakeley', 'Sampleo', 'Mockery', 'Dummon', 'Placeholda'];
const pad = (n: number, w: number) => String(n).padStart(w, '0');
/** A unique fake SSN per patient number: 999-xx-xxxx (999 is never issued). */
const ssnOf = (i: number) => `999-${pad(Math.floor(i / 10000) % 100, 2)}-${pad(i % 10000, 4)}`;

function syntheticPatient(i: number): Json {
  const r = prng(cfg.seed * 7919 + i);
  const given = GIVEN[Math.floor(r() * GIVEN.length)]!;
  return {
    resourceType: 'Patient',
    meta: { security: [HTEST] },
    text: {
      status: 'generated',
      div: `<div xmlns="http://www.w3.org/1999/xhtml">Testpatient ${given} (synthetic test patient ${i}, not a real person)</div>`,
    },
    identifier: [
      {
        type: { coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v2-0203', code: 'SS' }] },
        system: SSN_SYSTEM,
        value: ssnOf(i),
      },
      { system: 'urn:custos:bench', value: `encbench-${cfg.seed}-${i}` },
    ],
    active: true,
    name: [{ use: 'official', family: 'Testpatient', given: [given, 'Benchmark'] }],
    telecom: [{ system: 'phone', value: `555-01${pad(Math.floor(r() * 100), 2)}`, use: 'home' }],
    gender: (['female', 'male', 'other', 'unknown'] as const)[Math.floor(r() * 4)],
    birthDate: `${1940 + Math.floor(r() * 80)}-${pad(1 + Math.floor(r() * 12), 2)}-${pad(1 + Math.floor(r() * 28), 2)}`,
    address: [
      { line: ['1 Test Street'], city: 'Testville', state: 'ZZ', postalCode: '00000', country: 'ZZ' },
    ],
  };
}

const DIAGNOSES = [
  ['44054006', 'Diabetes mellitus type 2 (disorder)'],
  ['38341003', 'Hypertensive disorder, systemic arterial (disorder)'],
  ['195662009', 'Acute viral pharyngitis (disorder)'],
  ['162864005', 'Body mass index 30+ - obesity (finding)'],
  ['10509002', 'Acute bronchitis (disorder)'],
] as const;

function syntheticCondition(i: number, patientId: string): Json {
  const [code, display] = DIAGNOSES[i % DIAGNOSES.length]!;
  return {
    resourceType: 'Condition',
    meta: { security: [HTEST] },
    clinicalStatus: {
      coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-clinical', code: 'active' }],
    },
    verificationStatus: {
      coding: [{ system: 'http://terminology.hl7.org/CodeSystem/condition-ver-status', code: 'confirmed' }],
    },
    category: [
      {
        coding: [
          { system: 'http://terminology.hl7.org/CodeSystem/condition-category', code: 'encounter-diagnosis' },
        ],
      },
    ],
    code: { coding: [{ system: 'http://snomed.info/sct', code, display }], text: display },
    subject: { reference: `Patient/${patientId}` },
    onsetDateTime: `20${pad(10 + (i % 14), 2)}-0${1 + (i % 9)}-15`,
    recordedDate: `20${pad(10 + (i % 14), 2)}-0${1 + (i % 9)}-15`,
  };
}

const createdId = (type: string, reply: Reply): string | undefined =>
  new RegExp(`/${type}/([A-Za-z0-9\\-.]+)/_history/`).exec(String(reply.headers.location ?? ''))?.[1];

interface Server {
  mode: 'on' | 'off';
  child: Child;
  client: HttpClient;
  token: { value: string };
  stopToken(): void;
  dataDir: string;
  logFile: string;
  dbName?: string;
  patients: string[];
  patientNumbers: number[];
  conditions: string[];
  nextPatient: number;
  startedAt: number;
  env: NodeJS.ProcessEnv;
  creds: { clientId: string; clientSecret: string };
  /** Requests sent, warm-up included, by kind. */
  sent: { creates: number; reads: number; searches: number };
}

async function createMany(s: Server, type: 'Patient' | 'Condition', n: number): Promise<LoadResult> {
  const base = s.nextPatient;
  let bodies: string[];
  if (type === 'Patient') {
    bodies = Array.from({ length: n }, (_, i) => JSON.stringify(syntheticPatient(base + i)));
    s.nextPatient += n;
  } else {
    const r = prng(cfg.seed + s.conditions.length);
    bodies = Array.from({ length: n }, (_, i) =>
      JSON.stringify(
        syntheticCondition(s.conditions.length + i, s.patients[Math.floor(r() * s.patients.length)]!),
      ),
    );
  }
  const result = await runLoad({
    client: s.client,
    concurrency: cfg.concurrency,
    total: n,
    maxSeconds: cfg.maxPhaseSeconds,
    build: (i) => ({
      method: 'POST',
      path: `/fhir/R4/${type}`,
      headers: fhirHeaders(s.token, true),
      body: bodies[i],
    }),
    onReply: (i, reply) => {
      const id = reply.status === 201 ? createdId(type, reply) : undefined;
      if (!id) return;
      if (type === 'Patient') {
        s.patients.push(id);
        s.patientNumbers.push(base + i);
      } else s.conditions.push(id);
    },
  });
  s.sent.creates += result.requests;
  return result;
}

async function readMany(
  s: Server,
  type: 'Patient' | 'Condition',
  n: number,
  seed: number,
): Promise<LoadResult> {
  const ids = type === 'Patient' ? s.patients : s.conditions;
  const r = prng(seed);
  const order = Array.from({ length: n }, () => ids[Math.floor(r() * ids.length)]!);
  const result = await runLoad({
    client: s.client,
    concurrency: cfg.concurrency,
    total: n,
    maxSeconds: cfg.maxPhaseSeconds,
    build: (i) => ({
      method: 'GET',
      path: `/fhir/R4/${type}/${order[i]}`,
      headers: fhirHeaders(s.token, false),
    }),
  });
  s.sent.reads += result.requests;
  return result;
}

/** Searches by SSN; every answer must hold exactly the one patient with that SSN. */
async function searchMany(
  s: Server,
  n: number,
  seed: number,
): Promise<LoadResult & { wrongMatches: number }> {
  const r = prng(seed);
  const order = Array.from({ length: n }, () => s.patientNumbers[Math.floor(r() * s.patientNumbers.length)]!);
  let wrong = 0;
  const result = await runLoad({
    client: s.client,
    concurrency: cfg.concurrency,
    total: n,
    maxSeconds: cfg.maxPhaseSeconds,
    build: (i) => ({
      method: 'GET',
      path: `/fhir/R4/Patient?identifier=${encodeURIComponent(`${SSN_SYSTEM}|${ssnOf(order[i]!)}`)}`,
      headers: fhirHeaders(s.token, false),
    }),
    onReply: (i, reply) => {
      if (reply.status !== 200) return;
      try {
        const b = JSON.parse(reply.body.toString()) as { entry?: { resource?: { identifier?: Json[] } }[] };
        const hits = (b.entry ?? []).filter((e) =>
          (e.resource?.identifier ?? []).some((x) => x.system === SSN_SYSTEM && x.value === ssnOf(order[i]!)),
        );
        if ((b.entry ?? []).length !== 1 || hits.length !== 1) wrong++;
      } catch {
        wrong++;
      }
    },
  });
  s.sent.searches += result.requests;
  return { ...result, wrongMatches: wrong };
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

async function startServer(kind: 'embedded' | 'postgres', mode: 'on' | 'off', tag: string): Promise<Server> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `custos-encbench-${mode}-`));
  const logFile = path.join(dataDir, 'server.log');
  const env: Record<string, string> = { CUSTOS_DATA_DIR: dataDir, CUSTOS_LOG_LEVEL: 'info' };
  if (mode === 'off') env.CUSTOS_ENCRYPTION = 'off';
  let dbName: string | undefined;
  if (kind === 'postgres') {
    dbName = `custos_encbench_${tag}_${mode}`;
    await adminQuery(`CREATE DATABASE ${dbName}`);
    await adminQuery(`CREATE DATABASE ${dbName}_audit`);
    env.CUSTOS_DATABASE_URL = withDatabase(pgAdminUrl!, dbName);
    env.CUSTOS_AUDIT_DATABASE_URL = withDatabase(pgAdminUrl!, `${dbName}_audit`);
  }
  const serverEnv = cleanEnv({ ...env, CUSTOS_PORT: String(await freePort()) });
  log(
    `${kind}/${mode}: starting Custos (data dir ${dataDir}${dbName ? `, databases ${dbName}[_audit]` : ''})`,
  );
  const child = await startCustos(serverEnv, logFile);
  const partial = { mode, child, dataDir, logFile, dbName };
  try {
    const creds = await custosInit(serverEnv);
    const client = new HttpClient(child.url, cfg.concurrency + 2);
    const tk = await tokenKeeper(client, creds);
    return {
      ...partial,
      client,
      token: tk.holder,
      stopToken: tk.stop,
      patients: [],
      patientNumbers: [],
      conditions: [],
      nextPatient: 0,
      startedAt: performance.now(),
      env: serverEnv,
      creds,
      sent: { creates: 0, reads: 0, searches: 0 },
    };
  } catch (e) {
    await child.stop().catch(() => {});
    throw e;
  }
}

async function stopServer(s: Partial<Server> & { child?: Child; dataDir?: string; dbName?: string }) {
  s.stopToken?.();
  s.client?.close();
  await s.child?.stop().catch(() => {});
  if (s.dataDir && flags['keep-data']) log(`kept data directory ${s.dataDir}`);
  else if (s.dataDir) fs.rmSync(s.dataDir, { recursive: true, force: true });
  if (s.dbName) {
    for (const db of [s.dbName, `${s.dbName}_audit`])
      await adminQuery(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`).catch((e: unknown) =>
        log(`drop ${db}: ${String(e)}`),
      );
  }
}

/** Error lines in a server's log (there should be none). */
function logErrorLines(s: Server): number {
  try {
    return (fs.readFileSync(s.logFile, 'utf8').match(/"level":"error"/g) ?? []).length;
  } catch {
    return -1;
  }
}

type PhaseName = 'create-patient' | 'create-condition' | 'read-patient' | 'read-condition' | 'search-ssn';

interface PhaseSample {
  round: number;
  order: number;
  perSecond: number;
  requests: number;
  ok: number;
  statuses: Record<string, number>;
  seconds: number;
  latencyMs: LoadResult['latencyMs'];
  cpuCores: ReturnType<typeof cpuDelta> & { foreignBefore: number };
  cpuMsPerRequest: { server: number; postgres: number };
  wrongMatches?: number;
}

async function runPhase(s: Server, name: PhaseName, roundNo: number, order: number): Promise<PhaseSample> {
  const foreignBefore = await waitForQuiet();
  const dbs = s.dbName ? [s.dbName, `${s.dbName}_audit`] : [];
  const a = cpuSnap(s.child.proc.pid, dbs);
  let r: LoadResult & { wrongMatches?: number };
  const seed = cfg.seed + roundNo * 101;
  switch (name) {
    case 'create-patient':
      r = await createMany(s, 'Patient', cfg.creates);
      break;
    case 'create-condition':
      r = await createMany(s, 'Condition', cfg.creates);
      break;
    case 'read-patient':
      r = await readMany(s, 'Patient', cfg.reads, seed + 1);
      break;
    case 'read-condition':
      r = await readMany(s, 'Condition', cfg.reads, seed + 2);
      break;
    case 'search-ssn':
      r = await searchMany(s, cfg.searches, seed + 3);
      break;
  }
  const b = cpuSnap(s.child.proc.pid, dbs);
  const cpu = cpuDelta(a, b);
  const ms = (ticks: number) => (r.requests > 0 ? round(((ticks / TICK) * 1000) / r.requests, 3) : 0);
  log(
    `  round ${roundNo} ${name} [${s.mode}]: ${r.perSecond}/s, p50 ${r.latencyMs.p50} ms, statuses ${JSON.stringify(r.statuses)}${r.wrongMatches ? `, WRONG MATCHES ${r.wrongMatches}` : ''}, cpu ${JSON.stringify(cpu)}`,
  );
  return {
    round: roundNo,
    order,
    perSecond: r.perSecond,
    requests: r.requests,
    ok: r.ok,
    statuses: r.statuses,
    seconds: r.seconds,
    latencyMs: r.latencyMs,
    cpuCores: { ...cpu, foreignBefore },
    cpuMsPerRequest: { server: ms(b.server - a.server), postgres: ms(ticksBetween(a.postgres, b.postgres)) },
    wrongMatches: r.wrongMatches,
  };
}

/** A sample taken while other processes used at most 0.3 cores. */
const isQuiet = (x: PhaseSample) => x.cpuCores.other <= 0.3;

/** The throughput cost over the rounds in which both the "on" and the "off" sample were quiet. */
function quietCost(on: PhaseSample[], off: PhaseSample[], perRound: number[]) {
  const quiet = on.map((_, i) => i).filter((i) => isQuiet(on[i]!) && isQuiet(off[i]!));
  return {
    quietRounds: quiet.map((i) => on[i]!.round),
    throughputCostQuietRounds: quiet.length ? round(median(quiet.map((i) => perRound[i]!)), 3) : null,
  };
}

const PHASES: PhaseName[] = [
  'create-patient',
  'create-condition',
  'read-patient',
  'read-condition',
  'search-ssn',
];

async function benchStorage(kind: 'embedded' | 'postgres') {
  const tag = randomBytes(4).toString('hex');
  const servers: Server[] = [];
  const out: Record<string, unknown> = { storage: kind, loadAverageAtStart: loadavg() };
  try {
    for (const mode of ['on', 'off'] as const) servers.push(await startServer(kind, mode, tag));
    if (kind === 'postgres') out.databases = servers.map((s) => s.dbName);
    const [on, off] = servers as [Server, Server];
    // Warm-up (not measured): both servers, every kind of request.
    log(`${kind}: warm-up (${cfg.warmup} of each request kind per server; not measured)`);
    for (const s of servers) {
      await createMany(s, 'Patient', cfg.warmup);
      if (s.patients.length === 0) throw new Error(`${kind}/${s.mode}: warm-up creates failed`);
      await createMany(s, 'Condition', cfg.warmup);
      if (s.conditions.length === 0) throw new Error(`${kind}/${s.mode}: warm-up Condition creates failed`);
      await readMany(s, 'Patient', cfg.warmup, 1);
      await readMany(s, 'Condition', cfg.warmup, 2);
      if (cfg.searches > 0) await searchMany(s, Math.min(cfg.warmup, cfg.searches), 3);
    }
    const samples: Record<string, { on: PhaseSample[]; off: PhaseSample[] }> = {};
    for (const p of PHASES) samples[p] = { on: [], off: [] };
    for (let r = 0; r < cfg.rounds; r++) {
      const order = r % 2 === 0 ? [on, off] : [off, on];
      log(`${kind}: round ${r + 1}/${cfg.rounds} (order ${order.map((s) => s.mode).join(', ')})`);
      for (const p of PHASES) {
        if (p === 'search-ssn' && cfg.searches === 0) continue;
        for (let k = 0; k < order.length; k++) {
          const s = order[k]!;
          samples[p]![s.mode].push(await runPhase(s, p, r + 1, k));
        }
      }
    }
    out.loadAverageAtEnd = loadavg();
    // PostgreSQL: transactions per request of each kind, from pg_stat_database (its counters are
    // flushed by idle backends within 10 s, hence the waits).
    let countedTransactions: Record<string, unknown> | undefined;
    if (kind === 'postgres' && cfg.countRequests > 0) {
      log(`${kind}: counting transactions per request (${cfg.countRequests} of each kind, 11 s waits)`);
      const xacts = async () => {
        await new Promise((r) => setTimeout(r, 11_000));
        const r = await adminQuery(
          `SELECT datname, xact_commit::bigint AS n FROM pg_stat_database WHERE datname IN (${servers.map((s) => `'${s.dbName}'`).join(', ')})`,
        );
        return new Map(r.rows.map((x: Record<string, string>) => [x.datname!, Number(x.n)]));
      };
      countedTransactions = {
        what: `pg_stat_database.xact_commit of the resource database per request (a statement outside a transaction counts 1, a BEGIN…COMMIT block 1), ${cfg.countRequests} requests of each kind`,
      };
      let before = await xacts();
      const n = cfg.countRequests;
      const kinds: [string, (s: Server) => Promise<LoadResult>][] = [
        ['create-patient', (s) => createMany(s, 'Patient', n)],
        ['create-condition', (s) => createMany(s, 'Condition', n)],
        ['read-patient', (s) => readMany(s, 'Patient', n, 7)],
        ['read-condition', (s) => readMany(s, 'Condition', n, 8)],
        ['search-ssn', (s) => searchMany(s, n, 9)],
      ];
      for (const [name, run] of kinds) {
        const done = new Map<string, number>();
        for (const s of servers) done.set(s.mode, (await run(s)).requests);
        const after = await xacts();
        countedTransactions[name] = Object.fromEntries(
          servers.map((s) => [
            s.mode,
            round(((after.get(s.dbName!) ?? 0) - (before.get(s.dbName!) ?? 0)) / (done.get(s.mode) || 1), 2),
          ]),
        );
        before = after;
      }
    }
    // Every resource created (warm-up included) read back once: a sealed element that no longer
    // opens answers 500 SEALED_DATA_INVALID.
    const verify: Record<string, unknown> = {};
    for (const s of servers) {
      const all = [
        ...s.patients.map((id) => `/fhir/R4/Patient/${id}`),
        ...s.conditions.map((id) => `/fhir/R4/Condition/${id}`),
      ];
      log(`${kind}/${s.mode}: reading back all ${all.length} created resources…`);
      const bad: string[] = [];
      const r = await runLoad({
        client: s.client,
        concurrency: cfg.concurrency,
        total: all.length,
        maxSeconds: 600,
        build: (i) => ({ method: 'GET', path: all[i]!, headers: fhirHeaders(s.token, false) }),
        onReply: (i, reply) => {
          if (reply.status !== 200 && bad.length < 10)
            bad.push(`${all[i]} → ${reply.status} ${reply.body.toString().slice(0, 200)}`);
        },
      });
      verify[s.mode] = {
        resources: all.length,
        statuses: r.statuses,
        firstFailures: bad,
        serverUptimeSeconds: round((performance.now() - s.startedAt) / 1000),
      };
    }
    out.readBackAll = verify;
    // Summaries.
    const summary: Record<string, unknown> = {};
    for (const p of PHASES) {
      const { on: a, off: b } = samples[p]!;
      if (a.length === 0) continue;
      const rOn = median(a.map((x) => x.perSecond));
      const rOff = median(b.map((x) => x.perSecond));
      const cpuOf = (x: PhaseSample) => x.cpuMsPerRequest.server + x.cpuMsPerRequest.postgres;
      const perRound = a.map((x, i) => round(1 - x.perSecond / b[i]!.perSecond, 3));
      summary[p] = {
        perSecondOn: rOn,
        perSecondOff: rOff,
        ratioOnOverOff: round(rOn / rOff, 3),
        throughputCost: round(1 - rOn / rOff, 3),
        throughputCostPerRound: perRound,
        throughputCostMedianOfRounds: round(median(perRound), 3),
        ...quietCost(a, b, perRound),
        cpuMsPerRequestOn: round(median(a.map(cpuOf)), 3),
        cpuMsPerRequestOff: round(median(b.map(cpuOf)), 3),
        serverCpuMsPerRequestOn: round(median(a.map((x) => x.cpuMsPerRequest.server)), 3),
        serverCpuMsPerRequestOff: round(median(b.map((x) => x.cpuMsPerRequest.server)), 3),
        cpuCostServerPlusPostgres: round(1 - median(b.map(cpuOf)) / median(a.map(cpuOf)), 3),
        p50MsOn: median(a.map((x) => x.latencyMs.p50)),
        p50MsOff: median(b.map((x) => x.latencyMs.p50)),
        non2xx: [...a, ...b].reduce((n, x) => n + (x.requests - x.ok), 0),
        wrongMatches:
          p === 'search-ssn' ? [...a, ...b].reduce((n, x) => n + (x.wrongMatches ?? 0), 0) : undefined,
        maxOtherCores: Math.max(...[...a, ...b].map((x) => x.cpuCores.other)),
      };
    }
    // Combined read and write throughput (both resource types; requests over time, per round, then median).
    const combined = (names: PhaseName[]) => {
      const per = (mode: 'on' | 'off') =>
        Array.from({ length: cfg.rounds }, (_, r) => {
          const xs = names.map((n) => samples[n]![mode][r]!);
          return xs.reduce((t, x) => t + x.ok, 0) / xs.reduce((t, x) => t + x.seconds, 0);
        });
      const a = per('on');
      const b = per('off');
      const perRound = a.map((x, i) => round(1 - x / b[i]!, 3));
      const quiet = Array.from({ length: cfg.rounds }, (_, r) => r).filter((r) =>
        names.every((n) => isQuiet(samples[n]!.on[r]!) && isQuiet(samples[n]!.off[r]!)),
      );
      return {
        perSecondOn: round(median(a), 1),
        perSecondOff: round(median(b), 1),
        throughputCost: round(1 - median(a) / median(b), 3),
        throughputCostPerRound: perRound,
        // The paired estimate: each round's on and off ran back to back, so their ratio cancels the
        // drift between rounds (tables grow, throughput falls) and a stall that hits one round
        // (a statistics pass, a burst of I/O) moves one of the ratios instead of both medians.
        throughputCostMedianOfRounds: round(median(perRound), 3),
        quietRounds: quiet.map((r) => r + 1),
        throughputCostQuietRounds: quiet.length ? round(median(quiet.map((r) => perRound[r]!)), 3) : null,
      };
    };
    const reads = combined(['read-patient', 'read-condition']);
    const writes = combined(['create-patient', 'create-condition']);
    out.summary = {
      what: "perSecond = median over rounds; throughputCost = 1 − on/off of those medians; throughputCostMedianOfRounds = median over rounds of each round's 1 − on/off (the targets' value); cpuMsPerRequest = CPU ms per request of the server child + PostgreSQL (auxiliary processes and the backends of this server's two databases; other databases' backends excluded): robust to foreign load",
      reads,
      writes,
      ...summary,
    };
    out.targets = [
      {
        name: 'read throughput cost ≤ 15%',
        value: reads.throughputCostMedianOfRounds,
        pass: reads.throughputCostMedianOfRounds <= 0.15,
        ratioOfMediansValue: reads.throughputCost,
        quietRoundsValue: reads.throughputCostQuietRounds,
        cpuCostPatientCondition: [
          (summary['read-patient'] as { cpuCostServerPlusPostgres: number }).cpuCostServerPlusPostgres,
          (summary['read-condition'] as { cpuCostServerPlusPostgres: number }).cpuCostServerPlusPostgres,
        ],
      },
      {
        name: 'write throughput cost ≤ 20%',
        value: writes.throughputCostMedianOfRounds,
        pass: writes.throughputCostMedianOfRounds <= 0.2,
        ratioOfMediansValue: writes.throughputCost,
        quietRoundsValue: writes.throughputCostQuietRounds,
        cpuCostPatientCondition: [
          (summary['create-patient'] as { cpuCostServerPlusPostgres: number }).cpuCostServerPlusPostgres,
          (summary['create-condition'] as { cpuCostServerPlusPostgres: number }).cpuCostServerPlusPostgres,
        ],
      },
    ];
    out.samples = samples;
    out.serverLogErrorLines = { on: logErrorLines(on), off: logErrorLines(off) };
    for (const s of servers) {
      s.stopToken();
      s.client.close();
      await s.child.stop();
    }
    out.sealedCheck = await sealedCheck(kind, servers);
    out.extraStatementCost = await extraStatementCost(kind, on);
    if (kind === 'postgres') {
      out.transactionsPerRequest = countedTransactions;
      out.statementCounts = await statementCounts(servers);
    }
    if (cfg.profile) out.profile = await profilePass(kind, servers);
    return out;
  } finally {
    for (const s of servers) await stopServer(s);
  }
}

/**
 * Proof that the "on" server stored sealed elements and the "off" one did not: resource rows with a
 * `sealed` value per type, read after the servers have stopped (PGlite is single-process).
 */
async function sealedCheck(kind: 'embedded' | 'postgres', servers: Server[]) {
  const sql = `SELECT resource_type, count(*)::int AS rows, count(sealed)::int AS sealed FROM resource
               WHERE resource_type IN ('Patient', 'Condition') GROUP BY 1 ORDER BY 1`;
  type Row = { resource_type: string; rows: number; sealed: number };
  const res: Record<string, unknown> = {};
  for (const s of servers) {
    let rows: Row[];
    try {
      if (kind === 'postgres') {
        const c = new pg.Client({ connectionString: withDatabase(pgAdminUrl!, s.dbName!) });
        await c.connect();
        try {
          rows = (await c.query<Row>(sql)).rows;
        } finally {
          await c.end();
        }
      } else {
        const db = new PGlite(path.join(s.dataDir, 'resources'));
        try {
          rows = (await db.query<Row>(sql)).rows;
        } finally {
          await db.close();
        }
      }
    } catch (e) {
      res[s.mode] = { error: String(e) };
      continue;
    }
    res[s.mode] = Object.fromEntries(rows.map((x) => [x.resource_type, { rows: x.rows, sealed: x.sealed }]));
  }
  return res;
}

const hrUs = () => Number(process.hrtime.bigint() / 1000n); // the clock of .cpuprofile timestamps

/**
 * Where the server's CPU goes, on and off: each server restarted on its data under
 * `node --cpu-prof`, sent a warm-up and then --profile-requests requests of each kind one phase
 * after the other; each phase is cut out of the profile by time window (bench/profile-summary.ts).
 * Separate from the measured rounds (the profiler slows the server).
 */
async function profilePass(kind: 'embedded' | 'postgres', servers: Server[]) {
  const out: Record<string, unknown> = {
    what: 'server main thread only (PostgreSQL not included); busyMsPerRequest = non-idle profile time ÷ requests; inclusive = share of busy time with a frame of the package on the stack',
  };
  const n = cfg.profileRequests;
  for (const s0 of servers) {
    const dir = path.join(s0.dataDir, 'profile');
    fs.mkdirSync(dir, { recursive: true });
    log(`${kind}/${s0.mode}: profiling (${n} requests of each kind under --cpu-prof)`);
    const child = await startCustos(s0.env, s0.logFile, ['--cpu-prof', '--cpu-prof-dir', dir]);
    const client = new HttpClient(child.url, cfg.concurrency + 2);
    let tk: Awaited<ReturnType<typeof tokenKeeper>> | undefined;
    const windows: Record<string, { from: number; to: number; requests: number }> = {};
    try {
      tk = await tokenKeeper(client, s0.creds);
      const s: Server = { ...s0, child, client, token: tk.holder, stopToken: tk.stop };
      await createMany(s, 'Patient', Math.min(200, n));
      await readMany(s, 'Patient', Math.min(200, n), 11);
      const phases: [PhaseName, () => Promise<LoadResult>][] = [
        ['create-patient', () => createMany(s, 'Patient', n)],
        ['create-condition', () => createMany(s, 'Condition', n)],
        ['read-patient', () => readMany(s, 'Patient', n * 2, 12)],
        ['read-condition', () => readMany(s, 'Condition', n * 2, 13)],
      ];
      for (const [name, run] of phases) {
        await waitForQuiet();
        const from = hrUs();
        const r = await run();
        windows[name] = { from, to: hrUs(), requests: r.requests };
      }
    } finally {
      tk?.stop();
      client.close();
      await child.stop();
    }
    const pid = child.proc.pid;
    const file = fs.readdirSync(dir).find((f) => f.includes(`.${pid}.0.`) && f.endsWith('.cpuprofile'));
    if (!file) {
      out[s0.mode] = { error: `no main-thread .cpuprofile for pid ${pid} in ${dir}` };
      continue;
    }
    const profile = readProfile(path.join(dir, file));
    const res: Record<string, unknown> = {};
    for (const [name, w] of Object.entries(windows)) {
      const sum = summarizeProfile(profile, w);
      const pick = (rows: { name: string; ms: number; pct: number }[], k: number) =>
        rows.slice(0, k).map((x) => `${x.name} ${x.pct}%`);
      res[name] = {
        requests: w.requests,
        busyMsPerRequest: round(sum.busyMs / w.requests, 3),
        cpuUtilisation: sum.cpuUtilisation,
        inclusiveByPackage: pick(sum.inclusiveByPackage, 14),
        selfByPackage: pick(sum.byPackage, 10),
        selfByFunction: pick(sum.byFunction, 12),
      };
    }
    out[s0.mode] = res;
  }
  return out;
}

/**
 * What the statement encryption added to every write before the epoch cache cost by itself:
 * Envelope.currentEpoch's `SELECT max(epoch) … FROM data_key` (now run at most once per
 * EPOCH_CACHE_MS per project and process, so the xact counts per create should match off), sent
 * sequentially on one connection to the "on" server's resource database after the servers have
 * stopped. CPU per statement: this process (the client side, as the server would spend it) and,
 * on PostgreSQL, the PostgreSQL processes; on embedded storage PGlite runs in this process.
 */
async function extraStatementCost(kind: 'embedded' | 'postgres', s: Server) {
  const sql = `SELECT max(epoch) AS epoch FROM data_key WHERE project_id = $1 AND kind = 'data' AND state = 'active'`;
  const n = kind === 'postgres' ? 3000 : 1500;
  let q: (text: string, params?: unknown[]) => Promise<{ rows: Record<string, unknown>[] }>;
  let close: () => Promise<void>;
  if (kind === 'postgres') {
    const c = new pg.Client({ connectionString: withDatabase(pgAdminUrl!, s.dbName!) });
    await c.connect();
    q = (text, params) => c.query(text, params);
    close = () => c.end();
  } else {
    const db = new PGlite(path.join(s.dataDir, 'resources'));
    q = (text, params) => db.query(text, params);
    close = () => db.close();
  }
  try {
    const project = (await q('SELECT project_id FROM data_key LIMIT 1')).rows[0]?.project_id;
    if (!project) return { error: 'no data_key row' };
    for (let i = 0; i < 200; i++) await q(sql, [project]);
    const dbs = s.dbName ? [s.dbName, `${s.dbName}_audit`] : [];
    const a = cpuSnap(undefined, dbs);
    const c0 = cpuNs();
    for (let i = 0; i < n; i++) await q(sql, [project]);
    const clientMs = (cpuNs() - c0) / 1e6 / n;
    const b = cpuSnap(undefined, dbs);
    return {
      statement: sql,
      statements: n,
      wallMsPerStatement: round((b.at - a.at) / n, 4),
      cpuMsPerStatement: {
        [kind === 'postgres' ? 'client' : 'inProcessPglite']: round(clientMs, 4),
        postgres:
          kind === 'postgres'
            ? round(((ticksBetween(a.postgres, b.postgres) / TICK) * 1000) / n, 4)
            : undefined,
      },
      otherCores: cpuDelta(a, b).other,
    };
  } finally {
    await close();
  }
}

/**
 * Statements the resource database ran, from pg_stat_database after the servers have stopped
 * (backends flush their counters when they exit): with the same requests sent to both servers,
 * the difference is what encryption adds (single statements outside a transaction count as one
 * transaction each).
 */
async function statementCounts(servers: Server[]) {
  await new Promise((r) => setTimeout(r, 1500));
  const out: Record<string, unknown> = {};
  for (const s of servers) {
    const r = await adminQuery(
      `SELECT datname, xact_commit::bigint AS xact_commit, xact_rollback::bigint AS xact_rollback,
              tup_returned::bigint AS tup_returned, tup_fetched::bigint AS tup_fetched, tup_inserted::bigint AS tup_inserted
         FROM pg_stat_database WHERE datname IN ('${s.dbName}', '${s.dbName}_audit') ORDER BY datname`,
    );
    out[s.mode] = {
      requestsSent: s.sent,
      ...Object.fromEntries(
        r.rows.map((x: Record<string, string>) => [
          x.datname!.endsWith('_audit') ? 'auditDb' : 'resourceDb',
          {
            xactCommit: Number(x.xact_commit),
            xactRollback: Number(x.xact_rollback),
            tupReturned: Number(x.tup_returned),
            tupFetched: Number(x.tup_fetched),
            tupInserted: Number(x.tup_inserted),
          },
        ]),
      ),
    };
  }
  return out;
}

// ================================================================================================

async function machine() {
  const cpus = os.cpus();
  const m: Record<string, unknown> = {
    cores: cpus.length,
    cpuModel: cpus[0]?.model,
    memoryGB: Math.round(os.totalmem() / 2 ** 30),
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    openssl: process.versions.openssl,
    aesHardware: (() => {
      try {
        return /\baes\b/.test(fs.readFileSync('/proc/cpuinfo', 'utf8'))
          ? 'AES-NI flag present'
          : 'no aes flag';
      } catch {
        return undefined;
      }
    })(),
  };
  if (pgAdminUrl && wanted.has('postgres')) {
    try {
      const r = await adminQuery(
        `SELECT current_setting('server_version') AS version, current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit`,
      );
      m.postgres = r.rows[0];
    } catch (e) {
      m.postgres = { error: String(e) };
    }
  }
  return m;
}

async function main() {
  const t0 = performance.now();
  const result: Record<string, unknown> = {
    bench: 'custos-encryption',
    command: `npm run bench:encryption${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    startedAt: new Date().toISOString(),
    loadAverageAtStart: loadavg(),
    config: cfg,
    machine: await machine(),
  };
  if (cfg.micro) {
    result.microForeignLoadBefore = await waitForQuiet();
    log('micro benchmarks…');
    result.micro = { loadAverageAtStart: loadavg(), ...(await micro()), loadAverageAtEnd: loadavg() };
  }
  if (cfg.http) {
    const storages: Record<string, unknown> = {};
    for (const kind of ['embedded', 'postgres'] as const) {
      if (!wanted.has(kind)) {
        storages[kind] = { skipped: 'not in --storage' };
        continue;
      }
      if (kind === 'postgres' && !pgAdminUrl) {
        storages[kind] = { skipped: 'set CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL' };
        continue;
      }
      try {
        storages[kind] = await benchStorage(kind);
      } catch (e) {
        log(`${kind}: FAILED: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
        storages[kind] = { error: e instanceof Error ? e.message : String(e) };
      }
    }
    result.http = storages;
  }
  result.loadAverageAtEnd = loadavg();
  result.totalSeconds = round((performance.now() - t0) / 1000, 1);
  result.sink = sink % 1000; // keeps the measured work observable
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
