import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { createTestStorage, needs, serverUrl, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';
import { freePort, startHarness, testPatient } from './support/harness.ts';
import { loadConfig } from '../src/config/config.ts';
import { silentLogger } from '../src/log/logger.ts';
import { startServer } from '../src/server.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import { AuditLog } from '../src/audit/audit-log.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { encodeAuditEvent, leafHash, type AuditEvent } from '../src/audit/audit-event.ts';
import {
  AUDIT_APP_GRANTS,
  AUDIT_APPEND_ONLY_TABLES,
  AUDIT_MIGRATIONS,
  AUDIT_SCHEMA_VERSION,
} from '../src/audit/audit-migrations.ts';
import { splitSql } from '../src/store/migrations.ts';

// `custos audit setup` and the INSERT/SELECT-only application role, on a PostgreSQL server only
// (embedded PGlite has no roles). Roles are cluster-wide on the shared server: every role made
// here has a random suffix and is dropped at the end.

const skip = needs('postgres');
const suffix = randomBytes(4).toString('hex');
const appRole = `custos_test_app_${suffix}`;
const rolesMade = new Set<string>([appRole]);

function withDatabase(url: string, db: string, user?: string, password?: string): string {
  const u = new URL(url);
  u.pathname = `/${db}`;
  if (user !== undefined) u.username = user;
  if (password !== undefined) u.password = password;
  return u.href;
}

async function admin<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

function event(requestId: string, i = 0): AuditEvent {
  return {
    v: 1,
    id: randomUUID(),
    time: new Date().toISOString(),
    phase: 'access',
    action: 'read',
    outcome: 'success',
    requestId,
    actor: { clientId: `test-${i}` },
    source: {},
  };
}

async function sqlstate(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (e) {
    return (e as { code?: string }).code ?? 'no-code';
  }
}

async function dropRoles(): Promise<void> {
  if (!serverUrl) return;
  await admin(serverUrl, async (c) => {
    for (const r of rolesMade) await c.query(`DROP ROLE IF EXISTS ${r}`);
  });
}

describe('custos audit setup (PostgreSQL)', { skip }, () => {
  let storage: TestStorage;
  let adminUrl: string;
  let appUrl: string;
  const env = () => ({ ...storage.env });

  before(async () => {
    storage = await createTestStorage();
    adminUrl = storage.auditDatabaseUrl!;
  });
  after(async () => {
    await storage?.cleanup();
    await dropRoles();
  });

  test('setup --json prints the application URL; that role may INSERT and SELECT, nothing else', async () => {
    const r = await runCustos(
      ['audit', 'setup', '--admin-url', adminUrl, '--app-role', appRole, '--json'],
      env(),
    );
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout) as { appDatabaseUrl: string };
    assert.deepEqual(Object.keys(out), ['appDatabaseUrl']);
    appUrl = out.appDatabaseUrl;
    const u = new URL(appUrl);
    const a = new URL(adminUrl);
    assert.equal(u.protocol, 'postgres:');
    assert.equal(u.username, appRole);
    assert.match(u.password, /^[A-Za-z0-9_-]{32}$/);
    assert.equal(`${u.host}${u.pathname}`, `${a.host}${a.pathname}`);

    const attrs = await admin(
      adminUrl,
      async (c) =>
        (
          await c.query(
            `SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin,
                  rolpassword LIKE 'SCRAM-SHA-256$%' AS scram
             FROM pg_authid WHERE rolname = $1`,
            [appRole],
          )
        ).rows[0],
    );
    assert.deepEqual(attrs, {
      rolsuper: false,
      rolcreaterole: false,
      rolcreatedb: false,
      rolreplication: false,
      rolbypassrls: false,
      rolcanlogin: true,
      scram: true,
    });

    // INSERT and SELECT through the audit log itself (its sequencer needs nothing more).
    const db = await PgDriver.open(appUrl, { max: 2 });
    try {
      const log = new AuditLog(db);
      assert.equal(await log.append(event('setup-probe')), 0);
      assert.equal(await log.size(), 1);
      assert.equal((await verifyAuditLog(log)).ok, true);
    } finally {
      await db.close();
    }

    await admin(appUrl, async (c) => {
      assert.equal((await c.query('SELECT current_user AS u')).rows[0].u, appRole);
      const refused = async (sql: string) => assert.equal(await sqlstate(c.query(sql)), '42501', sql);
      for (const { table: t } of AUDIT_APP_GRANTS) {
        // Any column will do: the privilege is checked before a row is looked at.
        const column = (
          await c.query<{ c: string }>(
            'SELECT column_name AS c FROM information_schema.columns WHERE table_name = $1 LIMIT 1',
            [t],
          )
        ).rows[0]!.c;
        await refused(`UPDATE ${t} SET ${column} = ${column}`);
        await refused(`DELETE FROM ${t}`);
        await refused(`TRUNCATE ${t}`);
        await refused(`ALTER TABLE ${t} DISABLE TRIGGER ALL`);
        await refused(`DROP TABLE ${t}`);
      }
      await refused(`INSERT INTO custos_audit_migration (version) VALUES (99)`);
      for (const g of AUDIT_APP_GRANTS.filter((x) => !x.privileges.includes('INSERT')))
        assert.equal(await sqlstate(c.query(`INSERT INTO ${g.table} DEFAULT VALUES`)), '42501', g.table);
      assert.equal((await c.query('SELECT count(*)::int AS n FROM audit_entry')).rows[0].n, 1);
    });
    // The triggers stay, for whoever owns the tables.
    await admin(adminUrl, async (c) => {
      const triggers = (
        await c.query<{ tgname: string }>(
          `SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'O' ORDER BY tgname`,
        )
      ).rows.map((r) => r.tgname);
      for (const table of AUDIT_APPEND_ONLY_TABLES)
        for (const t of [`${table}_no_update`, `${table}_no_truncate`])
          assert.ok(triggers.includes(t), `trigger ${t} is enabled`);
      assert.equal(await sqlstate(c.query('TRUNCATE audit_checkpoint')), 'P0001');
    });
  });

  test('a Custos server runs on the application role: reads and writes audited, verify passes', async () => {
    const h = await startHarness({
      storage,
      env: { CUSTOS_AUDIT_DATABASE_URL: appUrl, CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0' },
    });
    try {
      const who = await h.server.core.auditDb.query<{ u: string }>('SELECT current_user AS u');
      assert.equal(who.rows[0]!.u, appRole);
      const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
      assert.equal(created.status, 201);
      const id = ((await created.json()) as { id: string }).id;
      const read = await h.fhir(`/Patient/${id}`);
      assert.equal(read.status, 200);
      const rows = await h.server.core.audit.read(0, 10_000);
      const phases = (rid: string | null) =>
        rows
          .map((r) => JSON.parse(r.entry.toString('utf8')) as AuditEvent)
          .filter((e) => e.requestId === rid)
          .map((e) => e.phase);
      assert.deepEqual(phases(created.headers.get('x-request-id')), ['attempt', 'outcome']);
      assert.deepEqual(phases(read.headers.get('x-request-id')), ['access']);
      const cp = await h.server.core.checkpoints.checkpoint(); // INSERT into audit_checkpoint
      assert.equal(cp.treeSize, await h.server.core.audit.size());
      // The server itself cannot rewrite what it wrote.
      assert.equal(await sqlstate(h.server.core.auditDb.query('DELETE FROM audit_entry')), '42501');

      const viaApi = await runCustos(['audit', 'verify', '--json'], {
        ...storage.env,
        CUSTOS_AUDIT_DATABASE_URL: appUrl,
      });
      assert.equal(viaApi.code, 0, viaApi.stderr);
      assert.match(viaApi.stderr, /admin API/);
      const report = JSON.parse(viaApi.stdout) as { ok: boolean; checkpoints: { checked: number } };
      assert.equal(report.ok, true);
      assert.equal(report.checkpoints.checked, 1);
    } finally {
      await h.close();
    }
    // Opening storage directly with the application role works too.
    const direct = await runCustos(['audit', 'verify'], {
      ...storage.env,
      CUSTOS_AUDIT_DATABASE_URL: appUrl,
    });
    assert.equal(direct.code, 0, direct.stderr);
    assert.match(direct.stderr, /opening storage directly/);
    assert.match(direct.stdout, /^audit log OK/);
  });

  test('setup is idempotent; it sets a new password only with --new-password', async () => {
    const state = () =>
      admin(adminUrl, async (c) => ({
        password: (await c.query('SELECT rolpassword FROM pg_authid WHERE rolname = $1', [appRole])).rows[0]
          .rolpassword as string,
        grants: (
          await c.query(
            `SELECT table_name, privilege_type FROM information_schema.role_table_grants
              WHERE grantee = $1 ORDER BY 1, 2`,
            [appRole],
          )
        ).rows,
        versions: (await c.query('SELECT version FROM custos_audit_migration ORDER BY 1')).rows.map(
          (r) => r.version,
        ),
        entries: (await c.query('SELECT count(*)::int AS n FROM audit_entry')).rows[0].n as number,
      }));
    const before = await state();
    assert.deepEqual(
      before.grants,
      AUDIT_APP_GRANTS.flatMap((g) =>
        g.privileges.map((p) => ({ table_name: g.table, privilege_type: p })),
      ).sort(
        (x, y) =>
          x.table_name.localeCompare(y.table_name) || x.privilege_type.localeCompare(y.privilege_type),
      ),
      'INSERT and SELECT only, nothing on other tables',
    );
    assert.deepEqual(
      before.versions,
      AUDIT_MIGRATIONS.map((m) => m.version),
    );

    const again = await runCustos(
      ['audit', 'setup', '--admin-url', adminUrl, '--app-role', appRole, '--json'],
      env(),
    );
    assert.equal(again.code, 0, again.stderr);
    const url = new URL((JSON.parse(again.stdout) as { appDatabaseUrl: string }).appDatabaseUrl);
    assert.equal(url.username, appRole);
    assert.equal(url.password, '', 'the kept password is not shown');
    assert.deepEqual(await state(), before, 'nothing changed');

    const human = await runCustos(['audit', 'setup', '--admin-url', adminUrl, '--app-role', appRole], env());
    assert.equal(human.code, 0, human.stderr);
    assert.equal(human.stdout.trim().split('\n').length, 1);
    assert.match(
      human.stdout,
      /schema version \d+ \(already current\).*password unchanged.*CUSTOS_AUDIT_DATABASE_URL=/,
    );

    const rotated = await runCustos(
      ['audit', 'setup', '--admin-url', adminUrl, '--app-role', appRole, '--new-password', '--json'],
      env(),
    );
    assert.equal(rotated.code, 0, rotated.stderr);
    const newUrl = (JSON.parse(rotated.stdout) as { appDatabaseUrl: string }).appDatabaseUrl;
    assert.notEqual(new URL(newUrl).password, new URL(appUrl).password);
    assert.match(new URL(newUrl).password, /^[A-Za-z0-9_-]{32}$/);
    const after = await state();
    assert.notEqual(after.password, before.password);
    assert.deepEqual({ ...after, password: '' }, { ...before, password: '' });
    appUrl = newUrl;
  });

  test('a server refuses an audit schema older than the code and names custos audit setup', async (t) => {
    await admin(adminUrl, (c) =>
      c.query(
        'DELETE FROM custos_audit_migration WHERE version = (SELECT max(version) FROM custos_audit_migration)',
      ),
    );
    try {
      const r = await runCustos(
        ['serve'],
        { ...storage.env, CUSTOS_AUDIT_DATABASE_URL: appUrl, CUSTOS_PORT: '0' },
        60_000,
      );
      assert.equal(r.code, 2, r.stderr);
      assert.equal(r.stdout, '');
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(
        lines[0]!,
        new RegExp(
          `^custos: configuration: CUSTOS_AUDIT_DATABASE_URL: the audit database is at schema version ${AUDIT_SCHEMA_VERSION - 1}, this Custos needs version ${AUDIT_SCHEMA_VERSION} .*custos audit setup --admin-url`,
        ),
      );
      // In-process too, and nothing was migrated (the application role could not have).
      const config = loadConfig({ ...storage.env, CUSTOS_AUDIT_DATABASE_URL: appUrl });
      await assert.rejects(startServer(config, silentLogger), (e: Error) => {
        assert.equal(e.name, 'ConfigError');
        assert.match(e.message, /custos audit setup/);
        return true;
      });
      const versions = await admin(adminUrl, async (c) =>
        (await c.query('SELECT version FROM custos_audit_migration ORDER BY 1')).rows.map((x) => x.version),
      );
      assert.deepEqual(versions, AUDIT_MIGRATIONS.map((m) => m.version).slice(0, -1));
      // Production never migrates the server audit database, even as its owner. (Key files of its
      // own: the development runs made a keyring with another passphrase.)
      const prodDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-test-prod-'));
      t.after(() => fs.rmSync(prodDir, { recursive: true, force: true }));
      const prod = loadConfig({
        ...storage.env,
        CUSTOS_DATA_DIR: prodDir,
        CUSTOS_ENV: 'production',
        CUSTOS_KEYRING_PASSPHRASE: 'test passphrase',
        CUSTOS_TRUSTED_PROXIES: '127.0.0.1',
        CUSTOS_PUBLIC_URL: 'https://custos.test',
      });
      await assert.rejects(
        startServer(prod, silentLogger),
        /does not migrate it in production.*custos audit setup/,
      );
    } finally {
      // What the deleted row stood for is still in place; restore the record.
      await admin(adminUrl, (c) =>
        c.query('INSERT INTO custos_audit_migration (version) VALUES ($1) ON CONFLICT DO NOTHING', [
          AUDIT_SCHEMA_VERSION,
        ]),
      );
    }
  });

  test('production refuses an audit role that could rewrite the log, and accepts the application role', async () => {
    // Resources and keys of its own: the development runs above made a keyring with another passphrase.
    const prodStorage = await createTestStorage();
    try {
      const prodEnv = {
        ...prodStorage.env,
        CUSTOS_AUDIT_DATABASE_URL: adminUrl,
        CUSTOS_ENV: 'production',
        CUSTOS_KEYRING_PASSPHRASE: 'test passphrase',
        CUSTOS_TRUSTED_PROXIES: '127.0.0.1',
        CUSTOS_PUBLIC_URL: 'https://custos.test',
      };
      await assert.rejects(startServer(loadConfig(prodEnv), silentLogger), /could rewrite the log/);
      const s = await startServer(
        loadConfig({ ...prodEnv, CUSTOS_AUDIT_DATABASE_URL: appUrl }),
        silentLogger,
      );
      await s.close();
    } finally {
      await prodStorage.cleanup();
    }
  });

  test('concurrent appends from two pools on one database are gapless and ordered', async () => {
    // Even where transactions default to REPEATABLE READ (the sequencer asks for READ COMMITTED).
    const dbName = new URL(adminUrl).pathname.slice(1);
    await admin(adminUrl, (c) =>
      c.query(`ALTER DATABASE ${dbName} SET default_transaction_isolation = 'repeatable read'`),
    );
    const a = await PgDriver.open(appUrl, { max: 4 });
    const b = await PgDriver.open(appUrl, { max: 4 });
    try {
      const logs = [new AuditLog(a), new AuditLog(b)];
      // One attempt: 150 appends per log, staggered over ~150 ms so that each log commits many batches
      // that contend for the lock; every attempt must be gapless and ordered. Returns how often the
      // sequence switches from one log's batch to the other's.
      const attempt = async (round: number): Promise<number> => {
        const base = await logs[0]!.size();
        const perLog = 150;
        const issued: { log: number; i: number; requestId: string; seq: Promise<number> }[] = [];
        await new Promise<void>((resolve) => {
          let pending = 2 * perLog;
          for (let log = 0; log < 2; log++) {
            for (let i = 0; i < perLog; i++) {
              setTimeout(
                () => {
                  const requestId = `concurrent-${log}-${round}-${i}`;
                  const seq = logs[log]!.append(event(requestId, i));
                  seq.catch(() => {}); // reported below, after all have settled
                  issued.push({ log, i, requestId, seq });
                  if (--pending === 0) resolve();
                },
                Math.floor(i + Math.random() * 10),
              );
            }
          }
        });
        const settled = await Promise.allSettled(issued.map((x) => x.seq));
        const failed = settled.filter((x) => x.status === 'rejected');
        assert.equal(
          failed.length,
          0,
          `appends failed: ${String((failed[0] as PromiseRejectedResult)?.reason)}`,
        );
        const seqs = settled.map((x) => (x as PromiseFulfilledResult<number>).value);
        const n = 2 * perLog;
        assert.deepEqual(
          [...seqs].sort((x, y) => x - y),
          Array.from({ length: n }, (_, k) => base + k),
          'every number once, no gap',
        );
        for (let log = 0; log < 2; log++) {
          const mine = issued.map((x, k) => ({ ...x, s: seqs[k]! })).filter((x) => x.log === log);
          for (let k = 1; k < mine.length; k++)
            assert.ok(mine[k]!.s > mine[k - 1]!.s, 'a log numbers its appends in the order they were made');
        }
        // What is stored under each number is what that append wrote.
        const rows = await logs[1]!.read(base, n + 10);
        assert.equal(rows.length, n);
        const bySeq = new Map(rows.map((r) => [r.seq, JSON.parse(r.entry.toString('utf8')) as AuditEvent]));
        issued.forEach((x, k) => assert.equal(bySeq.get(seqs[k]!)?.requestId, x.requestId));
        assert.equal(await logs[0]!.size(), base + n);
        const owner = rows.map((r) => bySeq.get(r.seq)!.requestId.split('-')[1]);
        return owner.filter((o, k) => k > 0 && o !== owner[k - 1]).length;
      };
      // The two logs must really contend: their batches interleave in the sequence. A stalled event
      // loop (a busy machine) can let one log's appends all go first; then try again, up to 3 times.
      let switches = 0;
      for (let round = 0; round < 3 && switches < 4; round++) switches = await attempt(round);
      assert.ok(switches >= 4, `batches of the two logs interleave (${switches} switches)`);
      assert.equal((await verifyAuditLog(logs[0]!)).ok, true);
    } finally {
      await a.close();
      await b.close();
      await admin(adminUrl, (c) => c.query(`ALTER DATABASE ${dbName} RESET default_transaction_isolation`));
    }
  });

  test('audit_append refuses a transaction that is not READ COMMITTED and appends nothing', async () => {
    // Under REPEATABLE READ its max(seq) would come from a snapshot taken before the sequence lock
    // was granted: a number another process already used. The fast path (autocommit) relies on this
    // refusal to fall back to a READ COMMITTED transaction.
    const entry = encodeAuditEvent(event('rr-refused'));
    const before = await admin(appUrl, (c) =>
      c.query<{ n: string }>('SELECT count(*) AS n FROM audit_entry'),
    );
    const code = await admin(appUrl, async (c) => {
      await c.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      try {
        return await sqlstate(
          c.query(
            `SELECT audit_append($1::bytea, '{0}', $2::int[], $3::bytea, $4::text[], $5::text[], '{}', '{}',
                                 '{}', '{}', '{}', '{}', '{}', '{}', '{}')`,
            [entry, [entry.length], leafHash(entry), ['rr-refused'], ['access']],
          ),
        );
      } finally {
        await c.query('ROLLBACK');
      }
    });
    assert.equal(code, 'CA001');
    const after = await admin(appUrl, (c) => c.query<{ n: string }>('SELECT count(*) AS n FROM audit_entry'));
    assert.equal(after.rows[0]!.n, before.rows[0]!.n);
    // The application role runs it (EXECUTE is PUBLIC's) and it writes entry and index rows at once.
    const a = await PgDriver.open(appUrl, { max: 1 });
    try {
      const seq = await new AuditLog(a).append(event('rc-accepted'));
      const rows = await admin(appUrl, (c) =>
        c.query<{ request_id: string; ix: number }>(
          'SELECT request_id, (SELECT count(*)::int FROM audit_index i WHERE i.seq = e.seq) AS ix FROM audit_entry e WHERE seq = $1',
          [seq],
        ),
      );
      assert.deepEqual(rows.rows, [{ request_id: 'rc-accepted', ix: 1 }]);
    } finally {
      await a.close();
    }
  });

  test('setup upgrades a version-2 audit database; the log continues without a gap', async () => {
    const db = `custos_test_v2_${suffix}`;
    await admin(serverUrl!, (c) => c.query(`CREATE DATABASE ${db}`));
    const url = withDatabase(serverUrl!, db);
    try {
      // What an older Custos left: migrations 1 and 2, three entries sequenced through audit_head.
      await admin(url, async (c) => {
        await c.query(
          'CREATE TABLE custos_audit_migration (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())',
        );
        for (const m of AUDIT_MIGRATIONS.filter((x) => x.version <= 2)) {
          for (const s of splitSql(m.sql)) await c.query(s);
          await c.query('INSERT INTO custos_audit_migration (version) VALUES ($1)', [m.version]);
        }
        for (let seq = 0; seq < 3; seq++) {
          const entry = encodeAuditEvent(event(`old-${seq}`));
          await c.query(
            `INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase) VALUES ($1, $2, $3, $4, 'access')`,
            [seq, entry, leafHash(entry), `old-${seq}`],
          );
        }
        await c.query('UPDATE audit_head SET next_seq = 3');
      });
      const role = `custos_test_v2app_${suffix}`;
      rolesMade.add(role);
      const r = await runCustos(['audit', 'setup', '--admin-url', url, '--app-role', role, '--json'], env());
      assert.equal(r.code, 0, r.stderr);
      const app = await PgDriver.open((JSON.parse(r.stdout) as { appDatabaseUrl: string }).appDatabaseUrl);
      try {
        const log = new AuditLog(app);
        assert.equal(await log.size(), 3);
        assert.equal(await log.append(event('new-0')), 3);
        assert.equal((await verifyAuditLog(log)).ok, true);
      } finally {
        await app.close();
      }
      const head = await admin(
        url,
        async (c) => (await c.query("SELECT to_regclass('audit_head') AS t")).rows[0].t,
      );
      assert.equal(head, null, 'the head row is gone');
    } finally {
      await admin(serverUrl!, (c) => c.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`));
    }
  });

  test('errors: one line, exit 1 when unreachable, 2 when the URL, privileges or protocol are wrong; nothing half-done', async () => {
    const oneLine = (r: { stdout: string; stderr: string }) => {
      assert.equal(r.stdout, '');
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    };
    const port = await freePort();
    const unreachable = await runCustos(
      ['audit', 'setup', '--admin-url', `postgres://postgres@127.0.0.1:${port}/x`, '--json'],
      env(),
    );
    assert.equal(unreachable.code, 1);
    oneLine(unreachable);
    assert.match(unreachable.stderr, /^custos: audit setup: cannot reach a server at 127\.0\.0\.1:\d+/);

    const http = net.createServer((s) => {
      s.once('data', () => s.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n'));
    });
    await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve));
    try {
      const addr = http.address() as net.AddressInfo;
      const notPg = await runCustos(
        ['audit', 'setup', '--admin-url', `postgres://postgres@127.0.0.1:${addr.port}/x`],
        env(),
      );
      assert.equal(notPg.code, 2);
      oneLine(notPg);
      assert.match(notPg.stderr, /does not speak the PostgreSQL protocol/);
    } finally {
      http.close();
    }

    const badRole = await runCustos(
      ['audit', 'setup', '--admin-url', adminUrl, '--app-role', 'Robert"); DROP'],
      env(),
    );
    assert.equal(badRole.code, 2);
    oneLine(badRole);

    const onResources = await runCustos(
      ['audit', 'setup', '--admin-url', storage.databaseUrl!, '--app-role', appRole],
      env(),
    );
    assert.equal(onResources.code, 2);
    oneLine(onResources);
    assert.match(onResources.stderr, /holds Custos resources/);

    // An admin that may create roles but not tables: the role it created is rolled back with the rest.
    const weak = `custos_test_weak_${suffix}`;
    const victim = `custos_test_never_${suffix}`;
    rolesMade.add(weak);
    rolesMade.add(victim);
    const db = `custos_test_priv_${suffix}`;
    const password = randomBytes(12).toString('hex');
    await admin(serverUrl!, async (c) => {
      await c.query(`CREATE ROLE ${weak} LOGIN CREATEROLE PASSWORD '${password}'`);
      await c.query(`CREATE DATABASE ${db}`);
    });
    try {
      const r = await runCustos(
        ['audit', 'setup', '--admin-url', withDatabase(serverUrl!, db, weak, password), '--app-role', victim],
        env(),
      );
      assert.equal(r.code, 2, r.stderr);
      oneLine(r);
      assert.match(r.stderr, /lacks a privilege needed for migrating the audit schema.*nothing was changed/);
      assert.ok(!r.stderr.includes(password));
      await admin(withDatabase(serverUrl!, db), async (c) => {
        assert.equal(
          (await c.query('SELECT count(*)::int AS n FROM pg_roles WHERE rolname = $1', [victim])).rows[0].n,
          0,
        );
        assert.equal((await c.query("SELECT to_regclass('custos_audit_migration') AS t")).rows[0].t, null);
      });
    } finally {
      await admin(serverUrl!, (c) => c.query(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`));
    }
  });
});
