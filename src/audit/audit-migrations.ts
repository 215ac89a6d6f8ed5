/**
 * Schema of the audit database, which is never the resource database. The audit issue moves these
 * into `custos audit setup` with an INSERT/SELECT-only role; the triggers already refuse changes.
 */
export const AUDIT_MIGRATIONS: readonly { version: number; name: string; sql: string }[] = [
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
];
