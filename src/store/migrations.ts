import type { SqlDriver, SqlQueryable } from './sql-driver.ts';
import type { Logger } from '../log/logger.ts';

/**
 * Versioned migrations of the resource database, applied in order at start. Never edit a
 * migration that has shipped: add the next one.
 */
export const RESOURCE_MIGRATIONS: readonly { version: number; name: string; sql: string }[] = [
  {
    version: 1,
    name: 'projects, principals, resources, versions',
    sql: `
CREATE TABLE project (
  id text PRIMARY KEY,
  name text NOT NULL,
  kind text NOT NULL CHECK (kind IN ('sandbox', 'production')),
  provenance_enabled boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now()
);
-- Minimal user record (issue 2); the access issue adds credentials, MFA and bindings.
CREATE TABLE app_user (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  role text NOT NULL CHECK (role IN ('admin', 'practitioner', 'patient', 'auditor')),
  email text NOT NULL,
  active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (project_id, email)
);
-- OAuth clients. No secret is stored here: a confidential client's secret is derived from a key
-- held in the data directory (see src/auth/client-registry.ts), so a dump of this database
-- reveals no credential.
CREATE TABLE oauth_client (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  name text NOT NULL,
  auth_method text NOT NULL CHECK (auth_method IN ('client_secret', 'private_key_jwt', 'none')),
  secret_version integer NOT NULL DEFAULT 0,
  jwks jsonb,
  scopes text[] NOT NULL,
  purposes text[] NOT NULL,
  may_break_glass boolean NOT NULL DEFAULT false,
  redirect_uris text[] NOT NULL DEFAULT '{}',
  active boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now()
);
-- oidc-provider's persistent models (grants, replay cache, ...): src/auth/oidc-adapter.ts.
CREATE TABLE oidc_payload (
  model text NOT NULL,
  id text NOT NULL,
  payload jsonb NOT NULL,
  grant_id text,
  user_code text,
  uid text,
  expires_at timestamptz,
  consumed_at timestamptz,
  PRIMARY KEY (model, id)
);
CREATE INDEX oidc_payload_grant ON oidc_payload (grant_id);
CREATE INDEX oidc_payload_uid ON oidc_payload (uid);
CREATE INDEX oidc_payload_expires ON oidc_payload (expires_at);

-- The current version of each resource. Every row belongs to a project; every key starts with it.
CREATE TABLE resource (
  project_id text NOT NULL REFERENCES project(id),
  resource_type text NOT NULL,
  id text NOT NULL,
  version_id integer NOT NULL,
  last_updated timestamptz NOT NULL,
  deleted boolean NOT NULL,
  content jsonb,
  -- Patient-compartment membership computed at write time (R4 CompartmentDefinition/patient).
  patients text[] NOT NULL DEFAULT '{}',
  PRIMARY KEY (project_id, resource_type, id)
);
CREATE INDEX resource_identifier ON resource USING gin ((content -> 'identifier') jsonb_path_ops);
CREATE INDEX resource_patients ON resource USING gin (patients);
-- Every version ever written, deletions included (versioned delete).
CREATE TABLE resource_version (
  project_id text NOT NULL,
  resource_type text NOT NULL,
  id text NOT NULL,
  version_id integer NOT NULL,
  last_updated timestamptz NOT NULL,
  deleted boolean NOT NULL,
  method text NOT NULL,
  content jsonb,
  patients text[] NOT NULL DEFAULT '{}',
  PRIMARY KEY (project_id, resource_type, id, version_id)
);
CREATE INDEX resource_version_time ON resource_version (project_id, last_updated);
CREATE INDEX resource_version_type_time ON resource_version (project_id, resource_type, last_updated);
`,
  },
  {
    version: 2,
    name: 'installation record for idempotent init',
    sql: `
CREATE TABLE installation (
  id integer PRIMARY KEY CHECK (id = 1),
  project_id text NOT NULL REFERENCES project(id),
  client_id text NOT NULL,
  admin_user_id text NOT NULL REFERENCES app_user(id),
  created_at timestamptz NOT NULL DEFAULT now()
);
`,
  },
  {
    version: 3,
    name: 'search index',
    sql: `
-- Exact-match keys (tokens, references, uris, composites, presence) of the current version, built
-- by src/fhir/search-index.ts; one GIN index intersects several criteria in one scan.
ALTER TABLE resource ADD COLUMN search_keys text[] NOT NULL DEFAULT '{}';
-- The extraction version the row was indexed with (custos reindex resumes from what is stale).
ALTER TABLE resource ADD COLUMN index_version integer NOT NULL DEFAULT 0;
CREATE INDEX resource_search_keys ON resource USING gin (search_keys);
CREATE INDEX resource_last_updated ON resource (project_id, resource_type, last_updated);
-- String values: norm is accent- and case-folded (prefix and :contains), exact is as written.
-- COLLATE "C" lets the btree serve LIKE 'prefix%' whatever the database's collation.
CREATE TABLE search_string (
  project_id text NOT NULL,
  resource_type text NOT NULL,
  id text NOT NULL,
  code text NOT NULL,
  norm text COLLATE "C" NOT NULL,
  exact text NOT NULL
);
CREATE INDEX search_string_value ON search_string (project_id, resource_type, code, norm);
CREATE INDEX search_string_resource ON search_string (project_id, resource_type, id, code);
-- Dates as ranges [lo, hi) at their precision; comp is the token part of a composite.
CREATE TABLE search_date (
  project_id text NOT NULL,
  resource_type text NOT NULL,
  id text NOT NULL,
  code text NOT NULL,
  lo timestamptz NOT NULL,
  hi timestamptz NOT NULL,
  comp text
);
CREATE INDEX search_date_lo ON search_date (project_id, resource_type, code, lo);
CREATE INDEX search_date_hi ON search_date (project_id, resource_type, code, hi);
CREATE INDEX search_date_resource ON search_date (project_id, resource_type, id, code);
-- Numbers and quantities.
CREATE TABLE search_number (
  project_id text NOT NULL,
  resource_type text NOT NULL,
  id text NOT NULL,
  code text NOT NULL,
  num numeric NOT NULL,
  system text,
  qcode text,
  unit text,
  comp text
);
CREATE INDEX search_number_value ON search_number (project_id, resource_type, code, num);
CREATE INDEX search_number_resource ON search_number (project_id, resource_type, id, code);
`,
  },
  {
    version: 4,
    name: 'field-level encryption: wrapped data keys, sealed elements',
    sql: `
-- Data keys (kind data, per epoch) and the blind-index key (kind blind, epoch 0) of each project,
-- only ever stored wrapped by the key provider's KEK (src/crypto/envelope.ts). No KEK is here.
CREATE TABLE data_key (
  project_id text NOT NULL REFERENCES project(id),
  kind text NOT NULL CHECK (kind IN ('data', 'blind')),
  epoch integer NOT NULL,
  provider text NOT NULL,
  kek_handle text NOT NULL,
  wrapped bytea NOT NULL,
  state text NOT NULL CHECK (state IN ('active', 'destroyed')),
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (project_id, kind, epoch)
);
-- Sealed protected elements per class: { class: "v1.<epoch>.<nonce>.<ciphertext>" }. The content
-- column holds the resource with those elements replaced by a data-absent-reason placeholder.
ALTER TABLE resource ADD COLUMN sealed jsonb;
ALTER TABLE resource_version ADD COLUMN sealed jsonb;
`,
  },
  {
    version: 5,
    name: 'crypto-shredding requests (dual control)',
    sql: `
CREATE TABLE key_destruction (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  requested_by text NOT NULL REFERENCES app_user(id),
  requested_at timestamptz NOT NULL DEFAULT now(),
  approved_by text REFERENCES app_user(id),
  approved_at timestamptz,
  state text NOT NULL CHECK (state IN ('pending', 'done')),
  CHECK (approved_by IS NULL OR approved_by <> requested_by)
);
`,
  },
  {
    version: 6,
    name: 'identities: credentials, MFA, lockout, FHIR binding, sessions',
    sql: `
-- People who log in (src/auth/users.ts, docs/users.md). password_hash is an Argon2id PHC string;
-- mfa_secret is the TOTP secret sealed (AES-256-GCM) under <data dir>/keys/totp-secret.key, never
-- in clear; mfa_last_step is the last TOTP time step accepted (replay refusal).
ALTER TABLE project ADD COLUMN mfa_required boolean NOT NULL DEFAULT false;
ALTER TABLE app_user ADD COLUMN fhir_user text;
ALTER TABLE app_user ADD COLUMN password_hash text;
ALTER TABLE app_user ADD COLUMN password_changed_at timestamptz;
ALTER TABLE app_user ADD COLUMN mfa_secret text;
ALTER TABLE app_user ADD COLUMN mfa_last_step bigint;
ALTER TABLE app_user ADD COLUMN failed_logins integer NOT NULL DEFAULT 0;
ALTER TABLE app_user ADD COLUMN lockouts integer NOT NULL DEFAULT 0;
ALTER TABLE app_user ADD COLUMN locked_until timestamptz;
ALTER TABLE app_user ADD COLUMN last_login_at timestamptz;
ALTER TABLE app_user ADD COLUMN deactivated_at timestamptz;
ALTER TABLE app_user ADD CONSTRAINT app_user_password_argon2id
  CHECK (password_hash IS NULL OR password_hash LIKE '$argon2id$%') NOT VALID;
ALTER TABLE app_user ADD CONSTRAINT app_user_patient_bound
  CHECK (role <> 'patient' OR fhir_user LIKE 'Patient/%') NOT VALID;
CREATE INDEX app_user_email ON app_user (lower(email));
-- Login sessions: only the SHA-256 of each session id is stored.
CREATE TABLE user_session (
  id_hash text PRIMARY KEY,
  user_id text NOT NULL REFERENCES app_user(id),
  project_id text NOT NULL REFERENCES project(id),
  amr text[] NOT NULL,
  created_at timestamptz NOT NULL,
  last_seen_at timestamptz NOT NULL,
  expires_at timestamptz NOT NULL,
  ended_at timestamptz,
  end_reason text
);
CREATE INDEX user_session_live ON user_session (user_id) WHERE ended_at IS NULL;
`,
  },
  {
    version: 7,
    name: 'project BAAs: production only with a recorded BAA',
    sql: `
-- Business Associate Agreements of projects (src/admin/project-baa.ts, docs/phi-boundary.md). The
-- signed document itself is not stored: only its SHA-256, to prove later which document it was.
ALTER TABLE project ADD COLUMN production_requested boolean NOT NULL DEFAULT false;
CREATE TABLE project_baa (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  counterparty text NOT NULL CHECK (length(counterparty) BETWEEN 1 AND 200),
  signed_by text NOT NULL CHECK (length(signed_by) BETWEEN 1 AND 200),
  signed_at text NOT NULL,
  document_sha256 text NOT NULL CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
  services text[] NOT NULL CHECK (cardinality(services) > 0),
  recorded_by text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX project_baa_project ON project_baa (project_id, recorded_at);
-- A project is production only with a recorded BAA, whatever writes the row.
CREATE FUNCTION project_production_needs_baa() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.kind = 'production' AND NOT EXISTS (SELECT 1 FROM project_baa WHERE project_id = NEW.id) THEN
    RAISE EXCEPTION 'a production project needs a recorded BAA' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER project_production_needs_baa BEFORE INSERT OR UPDATE OF kind ON project
  FOR EACH ROW EXECUTE FUNCTION project_production_needs_baa();
`,
  },
  {
    version: 8,
    name: 'vendor registry: vendors, endpoints, vendor BAAs',
    sql: `
-- The vendor registry (src/egress/vendor-registry.ts, docs/phi-boundary.md): the only destinations
-- the egress gateway sends to. The signed BAA document is not stored, only its SHA-256.
CREATE TABLE vendor (
  id text PRIMARY KEY,
  name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  services text[] NOT NULL DEFAULT '{}',
  phi_class text NOT NULL CHECK (phi_class IN ('full', 'limited', 'deidentified', 'none')),
  created_by text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX vendor_name ON vendor (lower(name));
CREATE TABLE vendor_endpoint (
  id text PRIMARY KEY,
  vendor_id text NOT NULL REFERENCES vendor(id),
  host text NOT NULL CHECK (length(host) BETWEEN 1 AND 253),
  port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
  protocol text NOT NULL CHECK (protocol IN ('https', 'tls', 'http')),
  allow_private boolean NOT NULL DEFAULT false,
  created_by text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (host, port),
  -- Plain http only to a private or loopback test server registered as such.
  CHECK (protocol <> 'http' OR allow_private)
);
CREATE INDEX vendor_endpoint_vendor ON vendor_endpoint (vendor_id);
CREATE TABLE vendor_baa (
  id text PRIMARY KEY,
  vendor_id text NOT NULL REFERENCES vendor(id),
  executed boolean NOT NULL,
  executed_at text,
  expires_on text CHECK (expires_on ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'),
  document_sha256 text CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
  recorded_by text NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  CHECK (NOT executed OR (executed_at IS NOT NULL AND expires_on IS NOT NULL AND document_sha256 IS NOT NULL))
);
CREATE INDEX vendor_baa_vendor ON vendor_baa (vendor_id, recorded_at);
`,
  },
  {
    version: 9,
    name: 'access policies (versioned) and break-glass alerts',
    sql: `
-- Access policies (src/phi/access-policy.ts, docs/access-policies.md): every change is a new
-- version row; the highest version of a (project, role) is in force; no row: the built-in default.
CREATE TABLE access_policy (
  project_id text NOT NULL REFERENCES project(id),
  role text NOT NULL CHECK (role IN ('practitioner', 'patient', 'admin', 'auditor')),
  version integer NOT NULL CHECK (version > 0),
  policy jsonb NOT NULL,
  changed_by text NOT NULL,
  changed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (project_id, role, version)
);
-- Break-glass grants, each an alert an administrator reviews. No reason here: it could hold PHI, so
-- it is only in the audit events of request_id, sealed.
CREATE TABLE break_glass (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  user_id text NOT NULL,
  client_id text NOT NULL,
  role text NOT NULL,
  purpose text NOT NULL,
  request_id text NOT NULL,
  started_at timestamptz NOT NULL,
  expires_at timestamptz NOT NULL CHECK (expires_at > started_at),
  reviewed_at timestamptz,
  reviewed_by text,
  outcome text CHECK (outcome IN ('justified', 'not-justified')),
  CHECK ((reviewed_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX break_glass_live ON break_glass (project_id, user_id, expires_at);
CREATE INDEX break_glass_pending ON break_glass (started_at) WHERE reviewed_at IS NULL;
`,
  },
  {
    version: 10,
    name: 'subscriptions: change feed, delivery queue, dead letters (issue 7)',
    // The change feed orders versions by (writing transaction, sequence): a version is read only
    // once every transaction that began before it has ended, so a cursor over it misses nothing
    // however commits interleave (src/subscriptions/subscription-queue.ts). Existing rows keep
    // NULL: they are before every subscription.
    sql: `
ALTER TABLE resource_version ADD COLUMN change_xid xid8;
ALTER TABLE resource_version ADD COLUMN change_seq bigint;
CREATE SEQUENCE resource_change_seq;
ALTER TABLE resource_version ALTER COLUMN change_xid SET DEFAULT pg_current_xact_id();
ALTER TABLE resource_version ALTER COLUMN change_seq SET DEFAULT nextval('resource_change_seq');
CREATE INDEX resource_version_change ON resource_version (change_xid, change_seq) WHERE change_xid IS NOT NULL;
CREATE TABLE subscription_cursor (
  name text PRIMARY KEY,
  change_xid xid8 NOT NULL,
  change_seq bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO subscription_cursor (name, change_xid, change_seq) VALUES ('rest-hook', '0', 0);
-- One row per notification: the resource version to notify, never its content.
CREATE TABLE subscription_delivery (
  id text PRIMARY KEY,
  project_id text NOT NULL REFERENCES project(id),
  subscription_id text NOT NULL,
  resource_type text NOT NULL,
  resource_id text NOT NULL,
  version_id integer NOT NULL,
  status text NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
  attempts integer NOT NULL DEFAULT 0,
  next_attempt_at timestamptz NOT NULL,
  last_error text,
  created_at timestamptz NOT NULL,
  delivered_at timestamptz,
  dead_at timestamptz,
  replays integer NOT NULL DEFAULT 0,
  UNIQUE (subscription_id, resource_type, resource_id, version_id)
);
CREATE INDEX subscription_delivery_due ON subscription_delivery (next_attempt_at) WHERE status = 'pending';
CREATE INDEX subscription_delivery_dead ON subscription_delivery (dead_at) WHERE status = 'dead';
CREATE INDEX subscription_delivery_done ON subscription_delivery (delivered_at) WHERE status = 'delivered';
-- Consecutive refusals by the egress gateway per subscription (error state after a few).
CREATE TABLE subscription_health (
  project_id text NOT NULL REFERENCES project(id),
  subscription_id text NOT NULL,
  consecutive_refusals integer NOT NULL DEFAULT 0,
  last_error text,
  updated_at timestamptz NOT NULL,
  PRIMARY KEY (project_id, subscription_id)
);
`,
  },
  {
    version: 11,
    name: 'subscription deliveries name their patients (egress disclosures in access reports, issue 7)',
    // Patient ids (identifiers Custos assigned, never content), a JSON array, taken from the
    // matched resource's patient compartment when the notification is queued; NULL before.
    sql: `ALTER TABLE subscription_delivery ADD COLUMN patients text;`,
  },
  {
    version: 12,
    name: 'GIN pending lists of the resource indexes capped at 256 kB',
    // A GIN index queues new entries in a pending list that every scan reads whole, until VACUUM
    // (or autovacuum's ANALYZE, or gin_clean_pending_list) merges it, or it passes
    // gin_pending_list_limit (4 MB by default). Where no autovacuum runs that was 4 MB read by every
    // search: 1.1-1.8 ms instead of 0.1 ms at 20,000 resources, and enough for the planner to prefer a
    // sequential scan. Capped at 256 kB a scan reads at most 32 pending pages; writes measured no
    // slower (docs/bench.md). Custos also empties the lists where no autovacuum runs
    // (src/store/planner-statistics.ts).
    sql: `
ALTER INDEX resource_search_keys SET (gin_pending_list_limit = 256);
ALTER INDEX resource_patients SET (gin_pending_list_limit = 256);
ALTER INDEX resource_identifier SET (gin_pending_list_limit = 256);
`,
  },
];

/** One schema step: SQL, and optionally work in the same transaction once the SQL ran (filling a
 * new table from existing rows, say). */
export interface Migration {
  version: number;
  name: string;
  sql: string;
  after?: (tx: SqlQueryable) => Promise<unknown>;
}

/** Applies pending migrations; safe to call at every start and from several processes. */
export async function migrate(
  db: SqlDriver,
  migrations: readonly Migration[],
  table: string,
  log?: Logger,
): Promise<void> {
  await db.query(
    `CREATE TABLE IF NOT EXISTS ${table} (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`,
  );
  for (const m of migrations) {
    await db.lockedTransaction(`custos-migrate-${table}`, async (tx) => {
      const done = await tx.query(`SELECT 1 FROM ${table} WHERE version = $1`, [m.version]);
      if (done.rows.length > 0) return;
      for (const stmt of splitSql(m.sql)) await tx.query(stmt);
      await m.after?.(tx);
      await tx.query(`INSERT INTO ${table} (version) VALUES ($1)`, [m.version]);
      log?.info('store.migrated', { migration: m.version });
    });
  }
}

/** Splits a migration into statements (our migrations use no semicolons inside literals or bodies
 * except within $$-quoted function bodies, which are kept whole). */
export function splitSql(sql: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inDollar = false;
  for (const line of sql.split('\n')) {
    if (line.trim().startsWith('--')) continue;
    const dollars = (line.match(/\$\$/g) ?? []).length;
    if (dollars % 2 === 1) inDollar = !inDollar;
    cur += line + '\n';
    if (!inDollar && line.trimEnd().endsWith(';')) {
      out.push(cur.trim());
      cur = '';
    }
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}
