import { createHash, createHmac, pbkdf2Sync, randomBytes } from 'node:crypto';
import pg from 'pg';
import { splitSql } from '../store/migrations.ts';
import {
  AUDIT_APP_GRANTS,
  AUDIT_MIGRATIONS,
  AUDIT_SCHEMA_VERSION,
  AUDIT_VERSION_TABLE,
} from './audit-migrations.ts';

/** The application role `custos audit setup` creates unless told another name. */
export const DEFAULT_AUDIT_APP_ROLE = 'custos_audit_app';

/**
 * Why a set-up failed. `exitCode` follows the CLI conventions: 2 when the command or what it was
 * pointed at must change (usage, a wrong URL, credentials, privileges, not PostgreSQL, the wrong
 * database or role), 1 when the operation failed in a way a retry may fix (the server unreachable,
 * an unexpected SQL error).
 */
export type AuditSetupProblem =
  | 'usage'
  | 'unreachable'
  | 'authentication'
  | 'no_database'
  | 'not_postgres'
  | 'privilege'
  | 'wrong_database'
  | 'unsafe_role'
  | 'failed';

/** A set-up that did nothing (its transaction rolled back); the message is one line, ours. */
export class AuditSetupError extends Error {
  constructor(
    readonly problem: AuditSetupProblem,
    message: string,
  ) {
    super(message);
    this.name = 'AuditSetupError';
  }

  get exitCode(): 1 | 2 {
    return this.problem === 'unreachable' || this.problem === 'failed' ? 1 : 2;
  }
}

export interface AuditSetupResult {
  /**
   * What CUSTOS_AUDIT_DATABASE_URL is set to: the admin URL with the application role's name and,
   * when a password was just set (role created, or `newPassword`), its password.
   */
  appDatabaseUrl: string;
  appRole: string;
  roleCreated: boolean;
  /** The URL carries the password (it is shown this once). */
  passwordSet: boolean;
  schemaVersion: number;
  /** Migrations this run applied (empty when the schema was current). */
  migrationsApplied: number[];
}

const ROLE_NAME = /^[a-z_][a-z0-9_]{0,62}$/;

function ident(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/**
 * A SCRAM-SHA-256 verifier (RFC 5802 / RFC 7677, stored as PostgreSQL's `SCRAM-SHA-256$…` text),
 * so that the password itself never travels in a statement a server log could record: what libpq's
 * PQencryptPasswordConn does for `createuser -P` and psql's `\password`. The password is base64url,
 * for which SASLprep is the identity.
 */
export function scramVerifier(password: string, salt = randomBytes(16), iterations = 4096): string {
  const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const clientKey = createHmac('sha256', salted).update('Client Key').digest();
  const storedKey = createHash('sha256').update(clientKey).digest();
  const serverKey = createHmac('sha256', salted).update('Server Key').digest();
  return `SCRAM-SHA-256$${iterations}:${salt.toString('base64')}$${storedKey.toString('base64')}:${serverKey.toString('base64')}`;
}

function sqlstate(e: unknown): string | undefined {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
]);

/** Maps a connection failure to one line naming the server (never the password) and the reason. */
function connectError(e: unknown, where: string, database: string): AuditSetupError {
  const code = sqlstate(e);
  if (code && NETWORK_CODES.has(code))
    return new AuditSetupError('unreachable', `cannot reach a server at ${where} (${code})`);
  if (code === '28P01' || code === '28000')
    return new AuditSetupError(
      'authentication',
      `the server at ${where} refused the admin credentials (SQLSTATE ${code})`,
    );
  if (code === '3D000')
    return new AuditSetupError(
      'no_database',
      `database ${database} does not exist at ${where}: create it first (CREATE DATABASE ${ident(database)})`,
    );
  if (e instanceof Error && /timeout/i.test(e.message))
    return new AuditSetupError('unreachable', `no answer from ${where} within 10 s`);
  if (code && /^[0-9A-Z]{5}$/.test(code))
    return new AuditSetupError('failed', `cannot connect to ${where} (SQLSTATE ${code})`);
  // No SQLSTATE and no network error: something answered, but not the PostgreSQL protocol.
  return new AuditSetupError('not_postgres', `the server at ${where} does not speak the PostgreSQL protocol`);
}

/**
 * `custos audit setup`: with an administrative role, creates or migrates the audit schema and
 * an application role that may only INSERT and SELECT on the audit tables (whose triggers refuse
 * UPDATE, DELETE and TRUNCATE), all in one transaction: on any error nothing is changed.
 *
 * Idempotent. Re-running re-applies missing migrations, the role's attributes (LOGIN, nothing
 * else) and its grants, and keeps its password: the URL it then returns has no password, unless
 * `newPassword` sets a new one (which running servers then need). See docs/adr/0006-audit-app-role.md.
 *
 * @example
 * const r = await setupAuditDatabase({ adminUrl: 'postgres://postgres@db.internal:5432/custos_audit' });
 * // r.appDatabaseUrl === 'postgres://custos_audit_app:…@db.internal:5432/custos_audit'
 */
export async function setupAuditDatabase(opts: {
  adminUrl: string;
  appRole?: string;
  newPassword?: boolean;
}): Promise<AuditSetupResult> {
  const appRole = opts.appRole ?? DEFAULT_AUDIT_APP_ROLE;
  if (!ROLE_NAME.test(appRole))
    throw new AuditSetupError(
      'usage',
      '--app-role must be a lower-case PostgreSQL identifier (letters, digits, _; at most 63)',
    );
  let url: URL;
  try {
    url = new URL(opts.adminUrl);
  } catch {
    throw new AuditSetupError(
      'usage',
      '--admin-url is not a URL (expected postgres://user@host:port/database)',
    );
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:')
    throw new AuditSetupError('usage', '--admin-url must start with postgres:// or postgresql://');
  const database = decodeURIComponent(url.pathname.slice(1));
  if (!database) throw new AuditSetupError('usage', '--admin-url must name the audit database');
  const where = `${url.hostname || 'localhost'}:${url.port || '5432'}`;

  const client = new pg.Client({ connectionString: opts.adminUrl, connectionTimeoutMillis: 10_000 });
  client.on('error', () => {}); // a dropped connection surfaces on the next query
  try {
    await client.connect();
  } catch (e) {
    await client.end().catch(() => {});
    throw connectError(e, where, database);
  }
  let step = 'checking the server';
  try {
    const info = await client.query<{ version: string; num: string; admin: string }>(
      "SELECT version() AS version, current_setting('server_version_num') AS num, current_user AS admin",
    );
    const { version, num, admin } = info.rows[0]!;
    if (!/^PostgreSQL /.test(version) || Number(num) < 110000)
      throw new AuditSetupError('not_postgres', `the server at ${where} is not PostgreSQL 11 or newer`);
    if (admin === appRole)
      throw new AuditSetupError(
        'usage',
        `--app-role must differ from the admin role (${admin}): the application role may only INSERT and SELECT`,
      );

    step = 'starting the transaction';
    await client.query('BEGIN');
    // The same lock as the migrations a development server runs at start (store/migrations.ts).
    await client.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [
      `custos-migrate-${AUDIT_VERSION_TABLE}`,
    ]);
    const resourceDb = await client.query<{ found: boolean }>(
      "SELECT to_regclass('custos_migration') IS NOT NULL AS found",
    );
    if (resourceDb.rows[0]?.found)
      throw new AuditSetupError(
        'wrong_database',
        `database ${database} holds Custos resources: the audit log needs a database of its own`,
      );

    step = 'creating the application role';
    const existing = await client.query<{ rolsuper: boolean }>(
      'SELECT rolsuper FROM pg_roles WHERE rolname = $1',
      [appRole],
    );
    const roleCreated = existing.rows.length === 0;
    const password = roleCreated || opts.newPassword ? randomBytes(24).toString('base64url') : undefined;
    const attributes = 'LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT';
    const pass = password ? ` PASSWORD '${scramVerifier(password)}'` : '';
    if (roleCreated) await client.query(`CREATE ROLE ${ident(appRole)} ${attributes}${pass}`);
    else {
      step = 'updating the application role';
      await client.query(`ALTER ROLE ${ident(appRole)} ${attributes}${pass}`);
      const memberOf = await client.query(
        `SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1`,
        [appRole],
      );
      if (memberOf.rows.length > 0)
        throw new AuditSetupError(
          'unsafe_role',
          `role ${appRole} is a member of other roles and could use their privileges: revoke them or choose another --app-role`,
        );
    }

    step = 'migrating the audit schema';
    await client.query(
      `CREATE TABLE IF NOT EXISTS ${AUDIT_VERSION_TABLE} (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`,
    );
    const done = new Set(
      (await client.query<{ version: number }>(`SELECT version FROM ${AUDIT_VERSION_TABLE}`)).rows.map((r) =>
        Number(r.version),
      ),
    );
    const migrationsApplied: number[] = [];
    for (const m of AUDIT_MIGRATIONS) {
      if (done.has(m.version)) continue;
      step = `applying audit migration ${m.version}`;
      for (const stmt of splitSql(m.sql)) await client.query(stmt);
      await m.after?.({
        query: async (sql, params) => ({ rows: (await client.query(sql, params as unknown[])).rows }),
      });
      await client.query(`INSERT INTO ${AUDIT_VERSION_TABLE} (version) VALUES ($1)`, [m.version]);
      migrationsApplied.push(m.version);
    }

    step = 'checking who owns the audit tables';
    const owned = await client.query(
      `SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY($1::text[])
          AND pg_has_role($2, tableowner, 'MEMBER')`,
      [AUDIT_APP_GRANTS.map((g) => g.table), appRole],
    );
    if (owned.rows.length > 0)
      throw new AuditSetupError(
        'unsafe_role',
        `role ${appRole} owns audit tables and could disable their triggers: choose another --app-role`,
      );

    step = 'granting the application role its privileges';
    // CONNECT and USAGE usually come with PUBLIC; grant them only where they do not (which needs
    // the database's or the schema's owner).
    const access = await client.query<{ db: string; schema: string; connect: boolean; usage: boolean }>(
      `SELECT current_database() AS db, current_schema() AS schema,
              has_database_privilege($1, current_database(), 'CONNECT') AS connect,
              has_schema_privilege($1, current_schema(), 'USAGE') AS usage`,
      [appRole],
    );
    const a = access.rows[0]!;
    if (!a.connect) await client.query(`GRANT CONNECT ON DATABASE ${ident(a.db)} TO ${ident(appRole)}`);
    if (!a.usage) await client.query(`GRANT USAGE ON SCHEMA ${ident(a.schema)} TO ${ident(appRole)}`);
    for (const g of AUDIT_APP_GRANTS) {
      await client.query(`REVOKE ALL ON TABLE ${ident(g.table)} FROM PUBLIC, ${ident(appRole)}`);
      await client.query(`GRANT ${g.privileges.join(', ')} ON TABLE ${ident(g.table)} TO ${ident(appRole)}`);
    }
    step = 'committing';
    await client.query('COMMIT');

    const app = new URL(opts.adminUrl);
    app.username = appRole;
    app.password = password ?? '';
    app.searchParams.delete('user');
    app.searchParams.delete('password');
    return {
      appDatabaseUrl: app.href,
      appRole,
      roleCreated,
      passwordSet: password !== undefined,
      schemaVersion: AUDIT_SCHEMA_VERSION,
      migrationsApplied,
    };
  } catch (e) {
    await client.query('ROLLBACK').catch(() => {});
    if (e instanceof AuditSetupError) throw e;
    const code = sqlstate(e);
    if (code === '42501')
      throw new AuditSetupError(
        'privilege',
        `the admin role lacks a privilege needed for ${step} (SQLSTATE 42501); nothing was changed`,
      );
    if (code && NETWORK_CODES.has(code))
      throw new AuditSetupError(
        'unreachable',
        `lost the connection to ${where} while ${step}; nothing was changed`,
      );
    // Only the SQLSTATE: a server message may quote values.
    throw new AuditSetupError(
      'failed',
      `failed while ${step}${code ? ` (SQLSTATE ${code})` : ''}; nothing was changed`,
    );
  } finally {
    await client.end().catch(() => {});
  }
}
