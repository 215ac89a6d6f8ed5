import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { fileURLToPath } from 'node:url';
import { PGlite } from '@electric-sql/pglite';

/**
 * Which storage the suite runs on. `npm test` uses embedded PGlite; with CUSTOS_TEST_DATABASE_URL
 * set (as .ci/run does) the same suites run on that PostgreSQL server, each test file in fresh
 * databases of its own. CUSTOS_TEST_REQUIRE=postgres turns "server not configured" from a skip
 * into a failure.
 */
export const serverUrl = process.env.CUSTOS_TEST_DATABASE_URL || undefined;
export const required = new Set(
  (process.env.CUSTOS_TEST_REQUIRE ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean),
);

/** For node:test's `skip` option: false when the component is there, else the reason (or a failure when required). */
export function needs(component: 'postgres'): false | string {
  if (component === 'postgres' && serverUrl) return false;
  if (required.has(component)) {
    throw new Error(
      `CUSTOS_TEST_REQUIRE includes ${component}, but it is not configured (set CUSTOS_TEST_DATABASE_URL)`,
    );
  }
  return `${component} not configured: set CUSTOS_TEST_DATABASE_URL to run this test`;
}

export interface TestStorage {
  kind: 'embedded' | 'postgres';
  dataDir: string;
  /** Environment for loadConfig(). */
  env: Record<string, string>;
  /** URLs of the created databases (postgres only). */
  databaseUrl?: string;
  auditDatabaseUrl?: string;
  cleanup(): Promise<void>;
}

function withDatabase(url: string, db: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  return u.href;
}

/**
 * An initialised, empty PGlite data directory, made once per PGlite version and copied for each
 * test: creating one costs seconds (initdb in WASM), copying one a fraction of that.
 */
async function pgliteTemplate(): Promise<string> {
  // Keyed by the installed PGlite's package.json (its exports map hides the file from require).
  const pkg = path.join(
    path.dirname(fileURLToPath(import.meta.resolve('@electric-sql/pglite'))),
    '..',
    'package.json',
  );
  const version = (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { version: string }).version;
  const dir = path.join(os.tmpdir(), `custos-test-pglite-template-${version}`);
  if (fs.existsSync(path.join(dir, 'PG_VERSION'))) return dir;
  const tmp = `${dir}.${process.pid}.${randomBytes(4).toString('hex')}`;
  const db = new PGlite(tmp);
  await db.waitReady;
  await db.close();
  try {
    fs.renameSync(tmp, dir);
  } catch {
    fs.rmSync(tmp, { recursive: true, force: true }); // another test process made it first
  }
  return dir;
}

/** A fresh data directory and, on a server, two fresh databases (resources and audit). */
export async function createTestStorage(opts: { forceServer?: boolean } = {}): Promise<TestStorage> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-test-'));
  const env: Record<string, string> = { CUSTOS_DATA_DIR: dataDir, CUSTOS_PORT: '0' };
  if (!serverUrl && !opts.forceServer) {
    const template = await pgliteTemplate();
    fs.cpSync(template, path.join(dataDir, 'resources'), { recursive: true });
    fs.cpSync(template, path.join(dataDir, 'audit'), { recursive: true });
    return {
      kind: 'embedded',
      dataDir,
      env,
      cleanup: async () => fs.rmSync(dataDir, { recursive: true, force: true }),
    };
  }
  if (!serverUrl) throw new Error('CUSTOS_TEST_DATABASE_URL is not set');
  const name = `custos_test_${randomBytes(6).toString('hex')}`;
  const admin = new pg.Client({ connectionString: serverUrl });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.query(`CREATE DATABASE ${name}_audit`);
  await admin.end();
  const databaseUrl = withDatabase(serverUrl, name);
  const auditDatabaseUrl = withDatabase(serverUrl, `${name}_audit`);
  env.CUSTOS_DATABASE_URL = databaseUrl;
  env.CUSTOS_AUDIT_DATABASE_URL = auditDatabaseUrl;
  return {
    kind: 'postgres',
    dataDir,
    env,
    databaseUrl,
    auditDatabaseUrl,
    async cleanup() {
      fs.rmSync(dataDir, { recursive: true, force: true });
      const c = new pg.Client({ connectionString: serverUrl });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.query(`DROP DATABASE IF EXISTS ${name}_audit WITH (FORCE)`);
      await c.end();
    },
  };
}
