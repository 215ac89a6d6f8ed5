/**
 * The cost of access-policy evaluation on a search (issue 6): `npm run -s bench:policy [-- flags]`.
 *
 * A search returning 100 Observations through the PHI gateway (the real one: audit durable before
 * the answer, field-level encryption on, a new session per request as the HTTP layer makes them),
 * in the same run, for
 *   system      a system client with system/*.rs: no role policy, no compartment (the baseline);
 *   care-team   a practitioner (user/*.rs) under the default practitioner policy: per request the
 *               role policy (cached), the care team resolved in SQL, the predicate compiled into the
 *               search SQL;
 *   patient     a patient (patient/*.rs, PATRQT) under the default patient policy: the compartment of
 *               their own Patient, from both the scopes and the policy.
 * Two query shapes: `Observation?subject=Patient/p0&_count=100` (the same 100 rows for everyone) and
 * `Observation?_count=100` (the policy does the narrowing: the system client gets 100 rows of all
 * patients). Variants alternate in rounds so that drift hits each alike. Target: policy adds ≤ 10%.
 *
 * Embedded PGlite always; a PostgreSQL server too when CUSTOS_BENCH_DATABASE_URL (or
 * CUSTOS_TEST_DATABASE_URL) is set: fresh databases custos_polbench_<hex> and <same>_audit, dropped
 * at the end. Flags: --iterations N (per variant and shape, default 300), --warmup N (default 30),
 * --patients N (default 20), --observations N (per patient, default 120), --storage embedded,postgres,
 * --json (one JSON document on stdout). Progress goes to stderr.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { loadConfig } from '../src/config/config.ts';
import { createLogger } from '../src/log/logger.ts';
import { openCore, type CustosCore } from '../src/server.ts';
import { PhiGateway, type Interaction, type Principal } from '../src/phi/gateway.ts';
import { validateResource } from '../src/fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../src/fhir/resource-types.ts';
import { allowsAnyContext, parseSmartScopes } from '../src/auth/smart-scopes.ts';
import { newId } from '../src/kernel/ids.ts';

const { values: flags } = parseArgs({
  options: {
    iterations: { type: 'string', default: '300' },
    warmup: { type: 'string', default: '30' },
    patients: { type: 'string', default: '20' },
    observations: { type: 'string', default: '120' },
    storage: { type: 'string' },
    json: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
});
if (flags.help) {
  process.stderr.write(
    'usage: npm run -s bench:policy -- [--iterations 300] [--warmup 30] [--patients 20] [--observations 120]\n' +
      '  [--storage embedded,postgres] [--json]\nPostgreSQL runs when CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL is set.\n',
  );
  process.exit(0);
}
const ITER = Number(flags.iterations);
const WARMUP = Number(flags.warmup);
const PATIENTS = Number(flags.patients);
const OBS = Number(flags.observations);
const pgAdminUrl = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL || undefined;
const storages = (flags.storage ?? (pgAdminUrl ? 'embedded,postgres' : 'embedded')).split(',');
const BASE = 'http://custos.bench/fhir/R4';
const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };
const LAB = { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'laboratory' };
const log = (s: string) => process.stderr.write(`policy-bench: ${s}\n`);

function system(projectId: string): Principal {
  const scopes = parseSmartScopes('system/*.cruds');
  return {
    projectId,
    clientId: 'bench-system',
    roles: ['system'],
    allowedPurposes: ['TREAT'],
    mayBreakGlass: false,
    can: (type: string, i: Interaction) => allowsAnyContext(scopes, type, i),
  };
}
function person(
  projectId: string,
  role: 'practitioner' | 'patient',
  fhirUser: string,
  scope: string,
  purposes: string[],
): Principal {
  const scopes = parseSmartScopes(scope);
  return {
    projectId,
    clientId: 'bench-app',
    userId: `bench-${role}`,
    userRole: role,
    fhirUser,
    scopes,
    roles: [role],
    allowedPurposes: purposes,
    mayBreakGlass: false,
    can: (type, i) => allowsAnyContext(scopes, type, i),
  };
}

interface Storage {
  env: Record<string, string>;
  cleanup(): Promise<void>;
}

async function openStorage(kind: string): Promise<Storage> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `custos-polbench-${kind}-`));
  if (kind === 'embedded')
    return {
      env: { CUSTOS_DATA_DIR: dataDir },
      cleanup: async () => fs.rmSync(dataDir, { recursive: true, force: true }),
    };
  if (!pgAdminUrl) throw new Error('set CUSTOS_BENCH_DATABASE_URL for postgres');
  const name = `custos_polbench_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: pgAdminUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.query(`CREATE DATABASE ${name}_audit`);
  await admin.end();
  const url = (db: string) => {
    const u = new URL(pgAdminUrl);
    u.pathname = `/${db}`;
    return u.href;
  };
  return {
    env: {
      CUSTOS_DATA_DIR: dataDir,
      CUSTOS_DATABASE_URL: url(name),
      CUSTOS_AUDIT_DATABASE_URL: url(`${name}_audit`),
    },
    async cleanup() {
      const c = new pg.Client({ connectionString: pgAdminUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.query(`DROP DATABASE IF EXISTS ${name}_audit WITH (FORCE)`);
      await c.end();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

const facts = (purpose: string) => ({ requestId: newId(), purposeHeader: purpose });

async function seed(gw: PhiGateway, projectId: string): Promise<void> {
  const sys = () => gw.session(system(projectId), facts('TREAT'));
  await sys().update('Practitioner', 'doc', {
    resourceType: 'Practitioner',
    id: 'doc',
    meta: { security: [HTEST] },
  });
  for (let p = 0; p < PATIENTS; p++) {
    // p0 and p1 are in the practitioner's care (generalPractitioner); the others are not.
    await sys().update('Patient', `p${p}`, {
      resourceType: 'Patient',
      id: `p${p}`,
      meta: { security: [HTEST] },
      ...(p < 2 ? { generalPractitioner: [{ reference: 'Practitioner/doc' }] } : {}),
    });
    for (let done = 0; done < OBS; done += 50) {
      const entry = [];
      for (let i = done; i < Math.min(OBS, done + 50); i++)
        entry.push({
          resource: {
            resourceType: 'Observation',
            meta: { security: [HTEST] },
            status: 'final',
            category: [{ coding: [LAB] }],
            code: { coding: [{ system: 'http://loinc.org', code: '2345-7' }] },
            subject: { reference: `Patient/p${p}` },
            valueQuantity: { value: 90 + (i % 40), unit: 'mg/dL' },
          },
          request: { method: 'POST', url: 'Observation' },
        });
      const r = await sys().transaction(BASE, { resourceType: 'Bundle', type: 'transaction', entry });
      if (r.status !== 200) throw new Error(`seed transaction: ${r.status}`);
    }
  }
}

interface Variant {
  name: string;
  principal: Principal;
  purpose: string;
}

const pct = (s: number[], q: number) => s[Math.min(s.length - 1, Math.floor(s.length * q))]!;

async function run(kind: string) {
  const storage = await openStorage(kind);
  let core: CustosCore | undefined;
  try {
    const config = loadConfig({ ...storage.env });
    core = await openCore(config, createLogger({ level: 'silent' }));
    const { projectId } = await core.admin.init();
    const gw = new PhiGateway({
      db: core.resourceDb,
      audit: core.audit,
      log: createLogger({ level: 'silent' }),
      validate: validateResource,
      isResourceType,
      resourceTypes: RESOURCE_TYPES,
      fhirBaseUrl: BASE,
      searchTimeoutMs: 10_000,
      encryption: core.encryption,
    });
    log(`${kind}: seeding ${PATIENTS} patients × ${OBS} Observations`);
    const t0 = Date.now();
    await seed(gw, projectId);
    log(`${kind}: seeded in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const variants: Variant[] = [
      { name: 'system', principal: system(projectId), purpose: 'TREAT' },
      {
        name: 'care-team',
        principal: person(projectId, 'practitioner', 'Practitioner/doc', 'user/*.rs', ['TREAT']),
        purpose: 'TREAT',
      },
      {
        name: 'patient',
        principal: person(projectId, 'patient', 'Patient/p0', 'patient/*.rs', ['PATRQT']),
        purpose: 'PATRQT',
      },
    ];
    const shapes = ['subject=Patient/p0&_count=100', '_count=100'];
    const once = async (v: Variant, q: string) => {
      const r = await gw.session(v.principal, facts(v.purpose)).search(BASE, {
        type: 'Observation',
        query: new URLSearchParams(q),
        strict: false,
        path: '/Observation',
      });
      const n = (JSON.parse(r.body!) as { entry?: unknown[] }).entry?.length ?? 0;
      if (n !== 100) throw new Error(`${v.name} ${q}: ${n} results, expected 100`);
    };
    const samples = new Map<string, number[]>();
    for (const q of shapes) for (const v of variants) for (let i = 0; i < WARMUP; i++) await once(v, q);
    const ROUND = 10;
    for (let done = 0; done < ITER; done += ROUND)
      for (const q of shapes)
        for (const v of variants) {
          const key = `${q}|${v.name}`;
          const arr = samples.get(key) ?? [];
          samples.set(key, arr);
          for (let i = 0; i < ROUND; i++) {
            const t = process.hrtime.bigint();
            await once(v, q);
            arr.push(Number(process.hrtime.bigint() - t) / 1e6);
          }
        }
    const rows = [];
    for (const q of shapes) {
      const base = samples.get(`${q}|system`)!.sort((a, b) => a - b);
      for (const v of variants) {
        const s = samples.get(`${q}|${v.name}`)!.sort((a, b) => a - b);
        rows.push({
          query: `Observation?${q}`,
          principal: v.name,
          n: s.length,
          p50Ms: Number(pct(s, 0.5).toFixed(2)),
          p95Ms: Number(pct(s, 0.95).toFixed(2)),
          p50Ratio: Number((pct(s, 0.5) / pct(base, 0.5)).toFixed(3)),
          p95Ratio: Number((pct(s, 0.95) / pct(base, 0.95)).toFixed(3)),
        });
      }
    }
    return { storage: kind, rows };
  } finally {
    await core?.close();
    await storage.cleanup();
  }
}

const results = [];
for (const kind of storages) results.push(await run(kind));
if (flags.json)
  console.log(
    JSON.stringify(
      { node: process.version, iterations: ITER, patients: PATIENTS, observationsPerPatient: OBS, results },
      null,
      2,
    ),
  );
else {
  console.log(
    `policy bench: search returning 100 Observations through the gateway, ${ITER} per cell, Node ${process.version}`,
  );
  for (const r of results) {
    console.log(`\n${r.storage}`);
    console.log('query                                    principal   p50 ms  p95 ms  p50 ratio  p95 ratio');
    for (const x of r.rows)
      console.log(
        `${x.query.padEnd(40)} ${x.principal.padEnd(10)} ${x.p50Ms.toFixed(2).padStart(7)} ${x.p95Ms
          .toFixed(2)
          .padStart(7)}  ${x.p50Ratio.toFixed(3).padStart(9)}  ${x.p95Ratio.toFixed(3).padStart(9)}`,
      );
  }
}
