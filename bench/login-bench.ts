/**
 * Custos login benchmark: `npm run bench:login` (= node --import tsx bench/login-bench.ts [flags]).
 *
 * What does a password login cost at the chosen Argon2id parameters (src/auth/passwords.ts,
 * ARGON2_PARAMS: m = 19 MiB, t = 2, p = 1)?
 *
 *   verify   Argon2id verification alone, in 1 and 2 worker threads (each loops `verifySync` on one
 *            hash for --seconds): verifications per second in total, and ms per verification.
 *   cpu      CPU time (user + system) of one verification, in this thread: the cost per login that
 *            does not depend on how busy the machine is; 1000 / cpuMs is one core's ceiling.
 *   hash     Argon2id hashing (what `custos user create` and a reset pay), one thread.
 *   login    UserService.verifyLogin end to end (user lookup, Argon2id verify, lockout reset, the
 *            audit event committed to the audit database) on real storage, with 1 and 2 logins in
 *            flight (Argon2 runs on the libuv thread pool, so two in flight use both cores):
 *            logins per second, and p50/p95 latency. A wrong-password login (which also counts the
 *            failure) is measured the same way, with lockout set out of reach.
 *   Embedded PGlite by default; a PostgreSQL server with CUSTOS_TEST_DATABASE_URL (fresh databases,
 *   dropped at the end). Each figure is the median of --rounds rounds.
 *
 * TOTP adds one HMAC-SHA1 per login (microseconds) and is not measured. Synthetic users only.
 * Prints ONE JSON document on stdout; progress goes to stderr. Results: docs/bench.md, "Login benchmark".
 */
import os from 'node:os';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { verifySync } from '@node-rs/argon2';
import { loadConfig } from '../src/config/config.ts';
import { silentLogger } from '../src/log/logger.ts';
import { dataPaths, openCore } from '../src/server.ts';
import { ARGON2_PARAMS, hashPassword } from '../src/auth/passwords.ts';
import { UserService } from '../src/auth/users.ts';
import { TotpSealer } from '../src/auth/totp.ts';
import { createTestStorage } from '../test/support/storage.ts';

const { values: flags } = parseArgs({
  options: {
    seconds: { type: 'string', default: '4' },
    rounds: { type: 'string', default: '3' },
  },
});
const SECONDS = Number(flags.seconds);
const ROUNDS = Number(flags.rounds);
const PASSWORD = 'violet-Zzyzx-harbour-1970';
const say = (s: string) => process.stderr.write(`login-bench: ${s}\n`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const round1 = (x: number) => Math.round(x * 10) / 10;

/** `threads` workers each verifying for SECONDS; total verifications per second. */
async function verifyThroughput(phc: string, threads: number): Promise<number> {
  const argon2Path = createRequire(import.meta.url).resolve('@node-rs/argon2');
  const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    const { verifySync } = require(workerData.argon2Path);
    const end = Date.now() + workerData.ms;
    let n = 0;
    while (Date.now() < end) { if (!verifySync(workerData.phc, workerData.password)) throw new Error('mismatch'); n++; }
    parentPort.postMessage(n);`;
  const started = performance.now();
  const counts = await Promise.all(
    Array.from(
      { length: threads },
      () =>
        new Promise<number>((resolve, reject) => {
          const w = new Worker(code, {
            eval: true,
            workerData: { argon2Path, phc, password: PASSWORD, ms: SECONDS * 1000 },
          });
          w.once('message', resolve);
          w.once('error', reject);
        }),
    ),
  );
  return counts.reduce((a, b) => a + b, 0) / ((performance.now() - started) / 1000);
}

/** `inFlight` concurrent loops of `fn` for SECONDS: per second, and latency percentiles (ms). */
async function loop(
  inFlight: number,
  fn: (i: number) => Promise<void>,
): Promise<{ perSecond: number; p50: number; p95: number }> {
  const latencies: number[] = [];
  const end = performance.now() + SECONDS * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: inFlight }, async (_, i) => {
      while (performance.now() < end) {
        const t = performance.now();
        await fn(i);
        latencies.push(performance.now() - t);
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  return {
    perSecond: latencies.length / ((performance.now() - started) / 1000),
    p50: latencies[Math.floor(latencies.length * 0.5)]!,
    p95: latencies[Math.floor(latencies.length * 0.95)]!,
  };
}

async function main() {
  say(
    `Argon2id m=${ARGON2_PARAMS.memoryCost} KiB t=${ARGON2_PARAMS.timeCost} p=${ARGON2_PARAMS.parallelism}`,
  );
  const phc = await hashPassword(PASSWORD);

  const hashMs: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const t = performance.now();
    let n = 0;
    while (performance.now() - t < 1000) {
      await hashPassword(PASSWORD);
      n++;
    }
    hashMs.push((performance.now() - t) / n);
  }

  const cpuMs: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const cpu = process.cpuUsage();
    const t = performance.now();
    let n = 0;
    while (performance.now() - t < 1000) {
      if (!verifySync(phc, PASSWORD)) throw new Error('mismatch');
      n++;
    }
    const used = process.cpuUsage(cpu);
    cpuMs.push((used.user + used.system) / 1000 / n);
  }
  say(`CPU per verification: ${median(cpuMs).toFixed(1)} ms`);

  const verify: Record<string, number[]> = { '1': [], '2': [] };
  for (let r = 0; r < ROUNDS; r++) {
    for (const threads of r % 2 === 0 ? [1, 2] : [2, 1]) {
      const v = await verifyThroughput(phc, threads);
      verify[threads]!.push(v);
      say(`round ${r + 1}: verify in ${threads} worker(s): ${v.toFixed(1)}/s`);
    }
  }

  const storage = await createTestStorage();
  const config = loadConfig(storage.env);
  const core = await openCore(config, silentLogger);
  const login: Record<string, { ok: number[]; p50: number[]; p95: number[]; bad: number[] }> = {
    '1': { ok: [], p50: [], p95: [], bad: [] },
    '2': { ok: [], p50: [], p95: [], bad: [] },
  };
  try {
    const { projectId } = await core.admin.init();
    // Lockout out of reach: the wrong-password loop must keep checking passwords.
    const users = new UserService({
      db: core.resourceDb,
      audit: core.audit,
      sessions: core.sessions,
      totp: TotpSealer.fromKeyFile(dataPaths(config.dataDir).totpKey),
      lockout: { threshold: 1_000_000_000, baseSeconds: 1, maxSeconds: 1 },
    });
    const emails = ['bench.one@example.org', 'bench.two@example.org'];
    for (const email of emails)
      await users.create({ projectId, role: 'practitioner', email, password: PASSWORD });
    for (let r = 0; r < ROUNDS; r++) {
      for (const n of r % 2 === 0 ? [1, 2] : [2, 1]) {
        const ok = await loop(n, async (i) => {
          const res = await users.verifyLogin({ projectId, email: emails[i % 2]!, password: PASSWORD });
          if (!res.ok) throw new Error(`login refused: ${res.reason}`);
        });
        const bad = await loop(n, async (i) => {
          const res = await users.verifyLogin({
            projectId,
            email: emails[i % 2]!,
            password: 'wrong-password-bench',
          });
          if (res.ok) throw new Error('wrong password accepted');
        });
        login[n]!.ok.push(ok.perSecond);
        login[n]!.p50.push(ok.p50);
        login[n]!.p95.push(ok.p95);
        login[n]!.bad.push(bad.perSecond);
        say(
          `round ${r + 1}: ${n} in flight: ${ok.perSecond.toFixed(1)} logins/s, ${bad.perSecond.toFixed(1)} refusals/s`,
        );
      }
    }
  } finally {
    await core.close();
    await storage.cleanup();
  }

  const out = {
    argon2id: ARGON2_PARAMS,
    machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version },
    storage: storage.kind,
    seconds: SECONDS,
    rounds: ROUNDS,
    loadAverage: os.loadavg().map(round1),
    cpuMsPerVerify: round1(median(cpuMs)),
    oneCoreCeilingPerSecond: round1(1000 / median(cpuMs)),
    hashMs: round1(median(hashMs)),
    verify: Object.fromEntries(
      Object.entries(verify).map(([k, v]) => [
        `${k}worker`,
        { perSecond: round1(median(v)), msPerVerify: round1((1000 * Number(k)) / median(v)) },
      ]),
    ),
    login: Object.fromEntries(
      Object.entries(login).map(([k, v]) => [
        `${k}inFlight`,
        {
          loginsPerSecond: round1(median(v.ok)),
          p50Ms: round1(median(v.p50)),
          p95Ms: round1(median(v.p95)),
          wrongPasswordPerSecond: round1(median(v.bad)),
        },
      ]),
    ),
  };
  process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
}

await main();
