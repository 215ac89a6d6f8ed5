import { ConfigError } from '../config/config.ts';
import type { Logger } from '../log/logger.ts';
import { migrate, type Migration } from '../store/migrations.ts';
import { AUDIT_INDEX_MIGRATION_SQL, backfillAuditIndex } from './audit-index.ts';
import { TILE_MIGRATION_SQL } from './tiles.ts';
import { SIEM_CURSOR_MIGRATION_SQL } from './siem-forwarder.ts';
import { ARCHIVE_MIGRATION_SQL } from './audit-retention.ts';
import type { SqlDriver } from '../store/sql-driver.ts';

/**
 * Schema of the audit database, which is never the resource database. Never edit a migration that
 * has shipped: add the next one (and, for a new table, a line in `AUDIT_APP_GRANTS`).
 *
 * On a PostgreSQL server the schema is created and migrated by `custos audit setup` (audit-setup.ts)
 * with an administrative role; Custos itself then runs as an application role that may only INSERT
 * and SELECT (docs/adr/0006-audit-app-role.md). Embedded PGlite is migrated at start.
 */
export const AUDIT_MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: 'sequenced, hashed audit entries',
    sql: `
CREATE TABLE audit_head (
  id integer PRIMARY KEY CHECK (id = 1),
  next_seq bigint NOT NULL
);
INSERT INTO audit_head (id, next_seq) VALUES (1, 0);
-- seq is the leaf index in the Merkle tree; entry holds the exact bytes that were hashed.
CREATE TABLE audit_entry (
  seq bigint PRIMARY KEY,
  entry bytea NOT NULL,
  leaf_hash bytea NOT NULL,
  request_id text NOT NULL,
  phase text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_entry_request ON audit_entry (request_id);
CREATE FUNCTION audit_entry_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit entries are append-only';
END;
$$;
CREATE TRIGGER audit_entry_no_update BEFORE UPDATE OR DELETE ON audit_entry
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
CREATE TRIGGER audit_entry_no_truncate BEFORE TRUNCATE ON audit_entry
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
`,
  },
  {
    version: 2,
    name: 'signed checkpoints',
    sql: `
-- Signed tree heads (C2SP tlog-checkpoint notes), append-only like the entries.
CREATE TABLE audit_checkpoint (
  tree_size bigint PRIMARY KEY,
  root_hash bytea NOT NULL,
  note text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER audit_checkpoint_no_update BEFORE UPDATE OR DELETE ON audit_checkpoint
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
`,
  },
  {
    version: 3,
    name: 'insert-only sequencer, truncate-proof checkpoints',
    sql: `
-- The next sequence number is now max(seq) + 1 read under a transaction-scoped advisory lock
-- (audit-log.ts): the head row needed an UPDATE, which the append-only application role lacks.
DROP TABLE audit_head;
CREATE TRIGGER audit_checkpoint_no_truncate BEFORE TRUNCATE ON audit_checkpoint
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
`,
  },
  {
    // Stored Merkle tiles (C2SP tlog-tiles), INSERT-only; the first checkpoint fills them.
    version: 4,
    name: 'Merkle tiles (C2SP tlog-tiles)',
    sql: TILE_MIGRATION_SQL,
  },
  {
    version: 5,
    name: 'audit query index',
    sql: AUDIT_INDEX_MIGRATION_SQL,
    // Entries appended before this migration get their rows in the same transaction.
    after: (tx) => backfillAuditIndex(tx),
  },
  {
    // Where forwarding to a SIEM has reached (siem-forwarder.ts), INSERT-only.
    version: 6,
    name: 'SIEM forwarding cursor',
    sql: SIEM_CURSOR_MIGRATION_SQL,
  },
  {
    // Witness cosignatures of signed checkpoints (witness.ts, C2SP tlog-cosignature), INSERT-only.
    version: 7,
    name: 'witness cosignatures',
    sql: `
CREATE TABLE audit_cosignature (
  tree_size bigint NOT NULL,
  -- the witness's verifier key (vkey, signature type 0x04)
  witness text NOT NULL,
  -- the note signature line, without its newline
  signature text NOT NULL,
  -- the cosignature's timestamp, POSIX seconds
  cosigned_at bigint NOT NULL,
  -- the cosigned note: our signed checkpoint followed by this signature line
  note text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tree_size, signature)
);
CREATE INDEX audit_cosignature_witness ON audit_cosignature (witness, tree_size);
CREATE TRIGGER audit_cosignature_no_update BEFORE UPDATE OR DELETE ON audit_cosignature
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
CREATE TRIGGER audit_cosignature_no_truncate BEFORE TRUNCATE ON audit_cosignature
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
`,
  },
  {
    // Archival beyond the retention period (audit-retention.ts): the watermark table, and DELETE of
    // entries and index rows below it, only in the archive's transaction, only by the owner.
    version: 8,
    name: 'audit archive watermarks',
    sql: ARCHIVE_MIGRATION_SQL,
  },
  {
    // A batch of appends in one statement, so one round trip (audit-log.ts). The same steps the
    // application ran as five statements: the sequence lock, max(seq) + 1 read after the lock was
    // granted, the entries and their query index rows. Each statement of a plpgsql function takes
    // its own snapshot only under READ COMMITTED, hence the check: the caller then runs it inside a
    // transaction that asks for READ COMMITTED. SECURITY INVOKER (the default): it can do only what
    // the calling role may, which for the application role is INSERT into the two tables.
    version: 9,
    name: 'appends in one statement',
    sql: `
-- entries: the entries' bytes end to end, entry i at entry_offsets[i] (0-based) for entry_lengths[i];
-- leaf_hashes: 32 bytes per entry, in order. One bytea each travels as raw bytes (binary parameter);
-- a bytea[] travels as hex text inside an array literal, twice the bytes and parsed twice.
CREATE FUNCTION audit_append(
  entries bytea, entry_offsets int[], entry_lengths int[], leaf_hashes bytea, request_ids text[], phases text[],
  ix_seq bigint[], ix_patient text[], ix_event_time timestamptz[], ix_action text[], ix_outcome text[],
  ix_purpose text[], ix_project_id text[], ix_client_id text[], ix_user_id text[]
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  start bigint;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'audit_append needs READ COMMITTED, the transaction is %',
      current_setting('transaction_isolation') USING ERRCODE = 'CA001';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('custos-audit-sequence', 0));
  SELECT coalesce(max(seq) + 1, 0) INTO start FROM audit_entry;
  INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase)
    SELECT start + u.ord - 1, substring(entries FROM u.off + 1 FOR u.len),
           substring(leaf_hashes FROM (u.ord::int - 1) * 32 + 1 FOR 32), u.request_id, u.phase
      FROM unnest(entry_offsets, entry_lengths, request_ids, phases)
           WITH ORDINALITY AS u(off, len, request_id, phase, ord);
  INSERT INTO audit_index (seq, patient, event_time, action, outcome, purpose, project_id, client_id, user_id)
    SELECT start + x.seq, x.patient, x.event_time, x.action, x.outcome, x.purpose, x.project_id,
           x.client_id, x.user_id
      FROM unnest(ix_seq, ix_patient, ix_event_time, ix_action, ix_outcome, ix_purpose, ix_project_id,
                  ix_client_id, ix_user_id)
           AS x(seq, patient, event_time, action, outcome, purpose, project_id, client_id, user_id);
  RETURN start;
END;
$$;
`,
  },
];

/** The table that records applied audit migrations (one row per version). */
export const AUDIT_VERSION_TABLE = 'custos_audit_migration';

/** The schema version this code needs: every migration above applied. */
export const AUDIT_SCHEMA_VERSION = Math.max(...AUDIT_MIGRATIONS.map((m) => m.version));

/**
 * What the application role may do, table by table: read and append, nothing else. `custos audit
 * setup` revokes everything else on these tables and grants exactly this.
 */
export const AUDIT_APP_GRANTS: readonly { table: string; privileges: readonly ('SELECT' | 'INSERT')[] }[] = [
  { table: 'audit_entry', privileges: ['SELECT', 'INSERT'] },
  { table: 'audit_checkpoint', privileges: ['SELECT', 'INSERT'] },
  { table: 'audit_index', privileges: ['SELECT', 'INSERT'] },
  { table: 'audit_tile', privileges: ['SELECT', 'INSERT'] },
  { table: 'audit_siem_cursor', privileges: ['SELECT', 'INSERT'] },
  { table: 'audit_cosignature', privileges: ['SELECT', 'INSERT'] },
  // Written only by `custos audit archive`, with the administrative role.
  { table: 'audit_archive', privileges: ['SELECT'] },
  { table: AUDIT_VERSION_TABLE, privileges: ['SELECT'] },
];

/** Tables whose rows are the evidence: no role Custos runs as may change or remove them. */
export const AUDIT_APPEND_ONLY_TABLES = [
  'audit_entry',
  'audit_checkpoint',
  'audit_index',
  'audit_tile',
  'audit_siem_cursor',
  'audit_cosignature',
  'audit_archive',
] as const;

interface SchemaState {
  /** Applied versions (empty when the version table does not exist). */
  applied: Set<number>;
  versionTableExists: boolean;
  superuser: boolean;
  /** The connected role is (a member of) the owner of the version table. */
  ownsSchema: boolean;
  /** The connected role may create tables in its current schema. */
  mayCreate: boolean;
}

async function schemaState(db: SqlDriver): Promise<SchemaState> {
  const r = await db.query<{
    exists: boolean;
    superuser: boolean;
    owns: boolean;
    may_create: boolean | null;
  }>(
    `SELECT to_regclass($1) IS NOT NULL AS exists,
            coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) AS superuser,
            coalesce((SELECT pg_has_role(current_user, tableowner, 'MEMBER') FROM pg_tables
                       WHERE schemaname = current_schema() AND tablename = $1), false) AS owns,
            has_schema_privilege(current_schema(), 'CREATE') AS may_create`,
    [AUDIT_VERSION_TABLE],
  );
  const s = r.rows[0]!;
  const applied = new Set<number>();
  if (s.exists) {
    const v = await db.query<{ version: number }>(`SELECT version FROM ${AUDIT_VERSION_TABLE}`);
    for (const row of v.rows) applied.add(Number(row.version));
  }
  return {
    applied,
    versionTableExists: s.exists,
    superuser: s.superuser,
    ownsSchema: s.owns,
    mayCreate: s.may_create === true,
  };
}

/**
 * Roles that could rewrite the evidence: a superuser, a member of an audit table's owner (it may
 * disable the triggers), or one holding UPDATE, DELETE or TRUNCATE on an audit table.
 */
async function mayBypassAppendOnly(db: SqlDriver): Promise<boolean> {
  const r = await db.query<{ bypass: boolean }>(
    `SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
         OR EXISTS (SELECT 1 FROM pg_tables
                     WHERE schemaname = current_schema() AND tablename = ANY($1::text[])
                       AND (pg_has_role(current_user, tableowner, 'MEMBER')
                            OR has_table_privilege(format('%I.%I', schemaname, tablename),
                                                   'UPDATE, DELETE, TRUNCATE'))) AS bypass`,
    [[...AUDIT_APPEND_ONLY_TABLES]],
  );
  return r.rows[0]?.bypass === true;
}

const SETUP_HINT =
  'run `custos audit setup --admin-url <URL of an administrative role>` and set CUSTOS_AUDIT_DATABASE_URL to the appDatabaseUrl it prints';

/**
 * Brings the audit schema to `AUDIT_SCHEMA_VERSION` where Custos may, and refuses to start where it
 * may not (docs/adr/0006-audit-app-role.md):
 * - embedded PGlite: migrated (the process owns it; there are no roles to separate);
 * - a PostgreSQL server in development: migrated when the configured role owns the audit schema
 *   (or the database is empty and it may create tables), as a superuser or the database owner
 *   does on a developer's machine; otherwise refused;
 * - a PostgreSQL server in production: never migrated here (schema changes go through
 *   `custos audit setup`, which also grants the application role its privileges on new tables),
 *   and refused when the configured role could rewrite the log.
 *
 * Throws a `ConfigError` naming CUSTOS_AUDIT_DATABASE_URL and `custos audit setup`.
 */
export async function prepareAuditSchema(
  db: SqlDriver,
  opts: { production: boolean; log?: Logger },
): Promise<void> {
  if (db.kind === 'embedded') {
    await migrate(db, AUDIT_MIGRATIONS, AUDIT_VERSION_TABLE, opts.log);
    return;
  }
  const state = await schemaState(db);
  const missing = AUDIT_MIGRATIONS.filter((m) => !state.applied.has(m.version));
  if (missing.length > 0) {
    const mayMigrate = state.superuser || state.ownsSchema || (!state.versionTableExists && state.mayCreate);
    if (opts.production || !mayMigrate) {
      const at = state.versionTableExists
        ? `is at schema version ${missing[0]!.version - 1}`
        : 'has no Custos audit schema';
      throw new ConfigError(
        'CUSTOS_AUDIT_DATABASE_URL',
        `the audit database ${at}, this Custos needs version ${AUDIT_SCHEMA_VERSION} and ` +
          `${opts.production ? 'does not migrate it in production' : 'the configured role may not migrate it'}: ${SETUP_HINT}`,
      );
    }
    await migrate(db, AUDIT_MIGRATIONS, AUDIT_VERSION_TABLE, opts.log);
  }
  if (opts.production && (await mayBypassAppendOnly(db))) {
    throw new ConfigError(
      'CUSTOS_AUDIT_DATABASE_URL',
      'production refuses an audit database role that could rewrite the log (a superuser, an owner of ' +
        `the audit tables, or one with UPDATE, DELETE or TRUNCATE on them): ${SETUP_HINT}`,
    );
  }
}
