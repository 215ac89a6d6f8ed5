/**
 * Retention and archival of the audit log (docs/audit.md, "Retention").
 *
 * Entries are kept at least six years (45 CFR 164.316(b)(2)). Beyond the configured retention period
 * (CUSTOS_AUDIT_RETENTION_YEARS, never less than six) `custos audit archive` may move the oldest entries
 * out of the database, never silently and never in a way that breaks the tree:
 *
 * - only a prefix of what is left (entries `from` … `to - 1`, `to` a multiple of 256, so that the stored
 *   level-0 tiles cover the archived entries exactly), and only entries whose time and whose
 *   `recorded_at` are both before `--before`, itself before now minus the retention period;
 * - into an archive directory holding the entries' exact bytes, the C2SP tiles of the tree of size
 *   `to`, the current signed checkpoint and an RFC 9162 consistency proof from `to` to it, a SHA-256
 *   manifest, and a note signed with the checkpoint key binding the range, its tree head and the
 *   manifest; the archive is read back and verified before anything is deleted;
 * - then, in one transaction under the sequencer's lock: the archive record (an admin event
 *   `audit.archived`) is appended, a watermark row is inserted into `audit_archive`, and the archived
 *   entries and their query index rows are deleted. The delete triggers allow exactly that (see
 *   {@link ARCHIVE_MIGRATION_SQL}).
 *
 * The tiles, checkpoints and cosignatures stay (they hold hashes, no content), so proofs, `custos audit
 * verify` and the tree head are unchanged; verify rebuilds the archived prefix from the stored level-0
 * tiles and checks it against the watermarks, their signed notes and their records in the log.
 * @module
 */
import { createHash, randomUUID, type Hash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { adminEvent, encodeAuditEvent, leafHash, type AuditEvent } from './audit-event.ts';
import { indexColumns, indexRowsOf, INDEX_COLUMNS, unnestIndexColumns } from './audit-index.ts';
import { AuditLog } from './audit-log.ts';
import { Checkpoints, type ConsistencyProof } from './checkpoints.ts';
import { HASH_SIZE, perfectRoot, verifyConsistency } from './merkle-proof.ts';
import { formatVerifierKey, parseCheckpoint, parseSignerKey, signNote, verifyNote } from './signed-note.ts';
import { copyTuples, TILE_BYTES, TILE_WIDTH, TileBuilder, tilePath } from './tiles.ts';
import { PgDriver } from '../store/pg/pg-driver.ts';
import { PgliteDriver } from '../store/pglite/pglite-driver.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';

/** The least retention the law allows: six years from creation (45 CFR 164.316(b)(2)(i)). */
export const MIN_RETENTION_YEARS = 6;
export const RETENTION_RULE = '45 CFR 164.316(b)(2)';
/** The format of an archive directory (manifest.json `format`). */
export const ARCHIVE_FORMAT = 'custos-audit-archive/1';
/** The first line of an archive's signed note. */
const NOTE_HEADER = 'custos audit archive v1';
/** The session setting the delete triggers look for: the watermark the deleting transaction inserted. */
const ARCHIVE_SETTING = 'custos.audit_archive';
/** The sequencer's lock (audit-log.ts): the archive record takes its sequence number under it. */
const SEQUENCE_LOCK = "pg_advisory_xact_lock(hashtextextended('custos-audit-sequence', 0))";

/**
 * Audit migration (audit-migrations.ts): the archive watermark table and the delete rule.
 *
 * `audit_archive` has one row per archive, INSERT-only; its insert trigger checks what an archive must
 * be (the next range after the last one, a multiple of 256, covered by stored level-0 tiles, entries
 * all older than the retention period by the database's clock, the archive record already in the log).
 *
 * The triggers that refused UPDATE and DELETE on `audit_entry` and `audit_index` (same names, so
 * whoever disables them by name still can) now let a DELETE of a row through only when its seq is below
 * the watermark the transaction named in `custos.audit_archive` (set_config(…, true): it ends with the
 * transaction); a statement-level trigger, run once before any row, refuses a DELETE by anyone but a
 * member of the table's owner, and a named watermark that is not the last one recorded. Per row, only
 * a setting is read. The application role has no DELETE privilege at all (`custos audit setup` grants
 * it SELECT on `audit_archive`, SELECT and INSERT elsewhere), so none of this is reachable for it:
 * privileges are checked before triggers run. The conditions stop accidents by the owner (a DELETE
 * typed in psql is refused unless it is exactly an archive's) and a role someone granted DELETE, not
 * the owner itself, who may disable triggers (or change the setting within the statement); that is
 * what verify, signed checkpoints and the watermark's signed note are for. No SECURITY DEFINER function
 * is involved. TRUNCATE stays refused.
 */
export const ARCHIVE_MIGRATION_SQL = `
-- Archival beyond the retention period (src/audit/audit-retention.ts, docs/audit.md "Retention").
CREATE TABLE audit_archive (
  archived_before bigint PRIMARY KEY CHECK (archived_before > 0 AND archived_before % 256 = 0),
  archived_from bigint NOT NULL CHECK (archived_from >= 0 AND archived_from < archived_before),
  root_hash bytea NOT NULL CHECK (length(root_hash) = 32),
  manifest_sha256 bytea NOT NULL CHECK (length(manifest_sha256) = 32),
  note text NOT NULL,
  record_seq bigint NOT NULL CHECK (record_seq >= archived_before),
  retention_years integer NOT NULL CHECK (retention_years >= 6),
  archived_by text NOT NULL DEFAULT current_user,
  archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION audit_archive_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  mark bigint;
BEGIN
  SELECT coalesce(max(archived_before), 0) INTO mark FROM audit_archive;
  IF NEW.archived_from <> mark THEN
    RAISE EXCEPTION 'an audit archive continues the previous one (archived_from must be %)', mark;
  END IF;
  IF (SELECT count(*) FROM audit_tile WHERE level = 0 AND idx < NEW.archived_before / 256)
     <> NEW.archived_before / 256 THEN
    RAISE EXCEPTION 'the stored Merkle tiles must cover every archived audit entry';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM audit_entry WHERE seq = NEW.record_seq) THEN
    RAISE EXCEPTION 'the archive record must be in the audit log';
  END IF;
  IF EXISTS (SELECT 1 FROM audit_entry
              WHERE seq >= NEW.archived_from AND seq < NEW.archived_before
                AND recorded_at >= now() - make_interval(years => NEW.retention_years)) THEN
    RAISE EXCEPTION 'audit entries younger than the retention period (45 CFR 164.316(b)(2)) cannot be archived';
  END IF;
  RETURN NEW;
END;
$$;
CREATE TRIGGER audit_archive_check BEFORE INSERT ON audit_archive
  FOR EACH ROW EXECUTE FUNCTION audit_archive_check();
CREATE TRIGGER audit_archive_no_update BEFORE UPDATE OR DELETE ON audit_archive
  FOR EACH ROW EXECUTE FUNCTION audit_entry_refuse_change();
CREATE TRIGGER audit_archive_no_truncate BEFORE TRUNCATE ON audit_archive
  FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_refuse_change();
-- Row level, under the names of the triggers it replaces: UPDATE refused; DELETE only of a row below the
-- watermark the transaction named (set_config(..., true)). Cheap: no table is read per row.
CREATE FUNCTION audit_refuse_change_unless_archived() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE'
     AND OLD.seq < coalesce(nullif(current_setting('${ARCHIVE_SETTING}', true), '')::bigint, 0) THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'audit entries are append-only (only custos audit archive removes archived entries)';
END;
$$;
-- Statement level, once per DELETE before any row: only a member of the table's owner deletes, and a
-- watermark named must be the last one recorded.
CREATE FUNCTION audit_delete_by_owner_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  named text := nullif(current_setting('${ARCHIVE_SETTING}', true), '');
BEGIN
  IF NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER') THEN
    RAISE EXCEPTION 'audit entries are append-only: only the owner of the audit tables removes archived entries';
  END IF;
  IF named IS NOT NULL AND named IS DISTINCT FROM (SELECT max(archived_before)::text FROM audit_archive) THEN
    RAISE EXCEPTION 'audit entries are append-only: ${ARCHIVE_SETTING} must name the last archive watermark';
  END IF;
  RETURN NULL;
END;
$$;
DROP TRIGGER audit_entry_no_update ON audit_entry;
CREATE TRIGGER audit_entry_no_update BEFORE UPDATE OR DELETE ON audit_entry
  FOR EACH ROW EXECUTE FUNCTION audit_refuse_change_unless_archived();
DROP TRIGGER audit_index_no_update ON audit_index;
CREATE TRIGGER audit_index_no_update BEFORE UPDATE OR DELETE ON audit_index
  FOR EACH ROW EXECUTE FUNCTION audit_refuse_change_unless_archived();
CREATE TRIGGER audit_entry_delete_by_owner BEFORE DELETE ON audit_entry
  FOR EACH STATEMENT EXECUTE FUNCTION audit_delete_by_owner_only();
CREATE TRIGGER audit_index_delete_by_owner BEFORE DELETE ON audit_index
  FOR EACH STATEMENT EXECUTE FUNCTION audit_delete_by_owner_only();
`;

/**
 * Why an archive run failed, or refused; the message is one line, ours. `exitCode` follows the CLI
 * conventions: 2 when the command or its inputs must change (usage, the retention rule, the wrong
 * database or schema), 1 when the log or the archive does not verify, or the operation failed.
 */
export class AuditArchiveError extends Error {
  constructor(
    readonly problem: 'usage' | 'retention' | 'schema' | 'unforwarded' | 'broken' | 'failed',
    message: string,
  ) {
    super(message);
    this.name = 'AuditArchiveError';
  }

  get exitCode(): 1 | 2 {
    return this.problem === 'broken' || this.problem === 'failed' ? 1 : 2;
  }
}

/**
 * `now` minus `years` calendar years (UTC): entries older than this may be archived. A 29 February
 * becomes 1 March in a year without one (Date arithmetic), which errs towards keeping longer.
 */
export function retentionCutoff(now: Date, years: number): Date {
  const d = new Date(now.getTime());
  d.setUTCFullYear(d.getUTCFullYear() - years);
  return d;
}

/**
 * `--before`: a date (`2019-06-30`, midnight UTC) or an instant with a zone (`2019-06-30T12:00:00Z`).
 * Undefined when it is neither, or not a real date (2019-02-30).
 */
export function parseArchiveBefore(text: string): Date | undefined {
  const m = /^(\d{4})-(\d{2})-(\d{2})(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2}))?$/.exec(text);
  if (!m) return undefined;
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const day = new Date(Date.UTC(y, mo - 1, d));
  if (day.getUTCFullYear() !== y || day.getUTCMonth() !== mo - 1 || day.getUTCDate() !== d) return undefined;
  if (!m[4]) return day;
  const t = Date.parse(text);
  return Number.isNaN(t) ? undefined : new Date(t);
}

/** Checks a retention period: a whole number of years, at least {@link MIN_RETENTION_YEARS}. */
export function checkRetentionYears(years: number): void {
  if (!Number.isSafeInteger(years) || years < MIN_RETENTION_YEARS)
    throw new AuditArchiveError(
      'retention',
      `the retention period must be a whole number of years, at least ${MIN_RETENTION_YEARS} (${RETENTION_RULE}); got ${years}`,
    );
}

// ---- the archive's signed note --------------------------------------------------------------------

/** What an archive's signed note states. */
export interface ArchiveStatement {
  origin: string;
  from: number;
  to: number;
  /** RFC 9162 head of the tree of size `to`. */
  rootHash: Buffer;
  manifestSha256: Buffer;
}

/** The note text: header, origin, from, to, base64 root hash, hex manifest SHA-256. */
export function formatArchiveStatement(s: ArchiveStatement): string {
  return `${NOTE_HEADER}\n${s.origin}\n${s.from}\n${s.to}\n${s.rootHash.toString('base64')}\n${s.manifestSha256.toString('hex')}\n`;
}

export function parseArchiveStatement(text: string): ArchiveStatement | undefined {
  const m =
    /^custos audit archive v1\n([^\n]+)\n(0|[1-9]\d*)\n([1-9]\d*)\n([A-Za-z0-9+/]{43}=)\n([0-9a-f]{64})\n$/.exec(
      text,
    );
  if (!m) return undefined;
  return {
    origin: m[1]!,
    from: Number(m[2]),
    to: Number(m[3]),
    rootHash: Buffer.from(m[4]!, 'base64'),
    manifestSha256: Buffer.from(m[5]!, 'hex'),
  };
}

// ---- watermarks, as verify reads them ---------------------------------------------------------------

/** One archive as the audit database remembers it (a row of `audit_archive`). */
export interface ArchiveWatermark {
  from: number;
  to: number;
  /** Hex. */
  rootHash: string;
  /** Hex SHA-256 of the archive's manifest.json. */
  manifestSha256: string;
  note: string;
  recordSeq: number;
  retentionYears: number;
  archivedBy: string;
  archivedAt: string;
}

/** The archives of the log, oldest first; none when the database has no archive table (older schema). */
export async function readArchiveWatermarks(db: SqlQueryable): Promise<ArchiveWatermark[]> {
  const t = await db.query<{ t: string | null }>("SELECT to_regclass('audit_archive')::text AS t");
  if (!t.rows[0]?.t) return [];
  const r = await db.query<{
    archived_from: number;
    archived_before: number;
    root_hash: Uint8Array;
    manifest_sha256: Uint8Array;
    note: string;
    record_seq: number;
    retention_years: number;
    archived_by: string;
    archived_at: Date | string;
  }>('SELECT * FROM audit_archive ORDER BY archived_before');
  return r.rows.map((w) => ({
    from: Number(w.archived_from),
    to: Number(w.archived_before),
    rootHash: Buffer.from(w.root_hash).toString('hex'),
    manifestSha256: Buffer.from(w.manifest_sha256).toString('hex'),
    note: w.note,
    recordSeq: Number(w.record_seq),
    retentionYears: Number(w.retention_years),
    archivedBy: w.archived_by,
    archivedAt: new Date(w.archived_at).toISOString(),
  }));
}

/** Stored level-0 tiles [0, count) in index order, in pages: the leaf hashes of an archived prefix. */
export async function* archivedLeafTiles(
  db: SqlQueryable,
  count: number,
): AsyncGenerator<{ index: number; hashes: Buffer }> {
  const PAGE = 256;
  for (let from = 0; from < count;) {
    const r = await db.query<{ idx: number; hashes: Uint8Array }>(
      'SELECT idx, hashes FROM audit_tile WHERE level = 0 AND idx >= $1 AND idx < $2 ORDER BY idx',
      [from, Math.min(count, from + PAGE)],
    );
    for (const row of r.rows) yield { index: Number(row.idx), hashes: Buffer.from(row.hashes) };
    if (r.rows.length === 0) return;
    from = Number(r.rows[r.rows.length - 1]!.idx) + 1;
  }
}

/** What verify found about the archived prefix. */
export interface ArchivedReport {
  /** Entries 0 … archivedBefore - 1 are archived (0: none). */
  archivedBefore: number;
  archives: ArchiveWatermark[];
  /** Whether the watermarks' signed notes were checked (verify was given the checkpoint key). */
  notesChecked: boolean;
  /** The first archive that does not check out, and why. */
  firstBad: { archivedBefore: number; problem: string } | undefined;
}

/**
 * The watermark half of verify, once the tree is rebuilt: the archives follow each other from 0; each
 * one's root is the tree head at its size (as verify recomputed it from the stored tiles); its note is
 * signed by the checkpoint key (when `verifierKey` is given) and states the same range, root and
 * manifest; and its record, unless archived since, is in the log and says the same. Entries below the
 * last watermark being absent is then what the archives explain, nothing else.
 */
export async function checkArchives(
  db: SqlQueryable,
  archives: ArchiveWatermark[],
  heads: ReadonlyMap<number, Buffer>,
  verifierKey: string | undefined,
  origin: string | undefined,
): Promise<ArchivedReport> {
  const last = archives[archives.length - 1];
  const report: ArchivedReport = {
    archivedBefore: last?.to ?? 0,
    archives,
    notesChecked: verifierKey !== undefined,
    firstBad: undefined,
  };
  const kept = report.archivedBefore;
  const recordSeqs = archives.filter((a) => a.recordSeq >= kept).map((a) => a.recordSeq);
  const records = new Map<number, Buffer>();
  if (recordSeqs.length > 0) {
    const r = await db.query<{ seq: number; entry: Uint8Array }>(
      'SELECT seq, entry FROM audit_entry WHERE seq = ANY($1::bigint[])',
      [recordSeqs],
    );
    for (const row of r.rows) records.set(Number(row.seq), Buffer.from(row.entry));
  }
  let expectFrom = 0;
  for (const a of archives) {
    const bad = (problem: string) => {
      report.firstBad = { archivedBefore: a.to, problem };
      return report;
    };
    if (a.from !== expectFrom)
      return bad(`it starts at ${a.from}, the previous archive ended at ${expectFrom}`);
    expectFrom = a.to;
    const head = heads.get(a.to);
    if (!head || head.toString('hex') !== a.rootHash)
      return bad('its root hash is not the tree head at its size');
    if (verifierKey) {
      let s: ArchiveStatement | undefined;
      try {
        s = parseArchiveStatement(verifyNote(a.note, [verifierKey]).text);
      } catch {
        s = undefined;
      }
      if (
        !s ||
        s.from !== a.from ||
        s.to !== a.to ||
        s.rootHash.toString('hex') !== a.rootHash ||
        s.manifestSha256.toString('hex') !== a.manifestSha256 ||
        (origin !== undefined && s.origin !== origin)
      )
        return bad('its signed note does not verify with the checkpoint key or states something else');
    }
    if (a.recordSeq >= kept) {
      const entry = records.get(a.recordSeq);
      let e: Partial<AuditEvent> | undefined;
      try {
        e = entry ? (JSON.parse(entry.toString('utf8')) as Partial<AuditEvent>) : undefined;
      } catch {
        e = undefined;
      }
      if (
        !e ||
        e.action !== 'admin' ||
        e.code !== 'audit.archived' ||
        e.resource?.type !== 'AuditArchive' ||
        e.resource.id !== `${a.from}-${a.to}` ||
        e.resource.version !== a.manifestSha256
      )
        return bad(`its record (sequence number ${a.recordSeq}) is not in the log or says something else`);
    }
  }
  return report;
}

// ---- the archive directory ----------------------------------------------------------------------------

/** manifest.json of an archive directory. */
export interface ArchiveManifest {
  format: typeof ARCHIVE_FORMAT;
  /** The log's origin (the checkpoint origin line). */
  origin: string;
  /** Entries `from` … `to - 1` are in entries.jsonl, one per line, in order. */
  from: number;
  to: number;
  /** Hex RFC 9162 head of the tree of size `to` (computable from the tiles here). */
  rootHash: string;
  /** The signed checkpoint in `checkpoint`, and the consistency proof from `to` to it. */
  head: { treeSize: number; rootHash: string };
  /** Time of the oldest and the youngest archived entry, and the `--before` they are older than. */
  oldestEntryTime: string;
  youngestEntryTime: string;
  before: string;
  retentionYears: number;
  createdAt: string;
  /** The database role that ran the archive (`current_user`). */
  createdBy: string;
  /** Every other file but SHA256SUMS and archive.note: path, size, SHA-256 (hex). */
  files: { path: string; bytes: number; sha256: string }[];
}

/** consistency.json of an archive directory. */
interface ConsistencyFile {
  from: number;
  to: number;
  fromRootHash: string;
  toRootHash: string;
  /** Hex node hashes (RFC 9162 §2.1.4). */
  proof: string[];
}

const ENTRIES_FILE = 'entries.jsonl';
const MANIFEST_FILE = 'manifest.json';
const SUMS_FILE = 'SHA256SUMS';
const NOTE_FILE = 'archive.note';
const CHECKPOINT_FILE = 'checkpoint';
const CONSISTENCY_FILE = 'consistency.json';
const VERIFIER_FILE = 'verifier.key';

/** What checking an archive directory found. */
export interface ArchiveCheckReport {
  ok: boolean;
  dir: string;
  from?: number;
  to?: number;
  entries?: number;
  /** Hex SHA-256 of manifest.json. */
  manifestSha256?: string;
  /** The key its notes were checked with: the running log's (`--archive` with verify), else the archive's own. */
  verifiedWith?: 'log' | 'archive';
  /** Everything that does not check out, most fundamental first (empty when ok). */
  problems: string[];
}

/** A log to check an archive against (`custos audit verify --archive`). */
export interface LiveLog {
  /** RFC 9162 consistency proof between two sizes of the live log, with both heads and the log's
   * verifier key (checkpoints.ts); the archive's notes are checked with that key, not its own. */
  consistency(from: number, to: number): Promise<ConsistencyProof>;
  /** The archives the live log remembers (verify's report), to find this one among them. */
  archives?: readonly ArchiveWatermark[];
}

function sha256(b: Buffer | string): Buffer {
  return createHash('sha256').update(b).digest();
}

async function fileSha256(file: string): Promise<{ bytes: number; sha256: string }> {
  const h = createHash('sha256');
  let bytes = 0;
  for await (const chunk of fs.createReadStream(file) as AsyncIterable<Buffer>) {
    h.update(chunk);
    bytes += chunk.length;
  }
  return { bytes, sha256: h.digest('hex') };
}

/** Lines of a file of entries, each without its newline (a final line without one is returned too). */
async function* lines(file: string): AsyncGenerator<Buffer> {
  let rest: Buffer = Buffer.alloc(0);
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 22 }) as AsyncIterable<Buffer>) {
    const buf = rest.length > 0 ? Buffer.concat([rest, chunk]) : chunk;
    let at = 0;
    for (let nl = buf.indexOf(0x0a, at); nl >= 0; nl = buf.indexOf(0x0a, at)) {
      yield buf.subarray(at, nl);
      at = nl + 1;
    }
    rest = Buffer.from(buf.subarray(at));
  }
  if (rest.length > 0) yield rest;
}

/** All regular files under `dir`, relative, with `/` separators. */
function listFiles(dir: string, sub = ''): string[] {
  const out: string[] = [];
  for (const d of fs.readdirSync(path.join(dir, sub), { withFileTypes: true })) {
    const rel = sub ? `${sub}/${d.name}` : d.name;
    if (d.isDirectory()) out.push(...listFiles(dir, rel));
    else out.push(rel);
  }
  return out;
}

const hex = (s: string) => Buffer.from(s, 'hex');

/**
 * Verifies an archive directory: every file against the manifest; the signed note (checkpoint key)
 * against the manifest; each entry's leaf hash against the level-0 tiles; the tree of size `to`
 * rebuilt from the level-0 tiles against the stored higher tiles and the manifest's root; the
 * consistency proof from `to` to the signed checkpoint. With `live`, also against the running log: its
 * verifier key (not the archive's own), its tree heads at both sizes, and its record of this archive.
 */
export async function verifyArchiveDir(dir: string, live?: LiveLog): Promise<ArchiveCheckReport> {
  const report: ArchiveCheckReport = { ok: false, dir: path.resolve(dir), problems: [] };
  const problem = (p: string) => report.problems.push(p);
  const finish = () => {
    report.ok = report.problems.length === 0;
    return report;
  };
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    problem('not a directory');
    return finish();
  }
  let manifestBytes: Buffer;
  let m: ArchiveManifest;
  try {
    manifestBytes = fs.readFileSync(path.join(dir, MANIFEST_FILE));
    m = JSON.parse(manifestBytes.toString('utf8')) as ArchiveManifest;
  } catch {
    problem(`${MANIFEST_FILE} is missing or not JSON`);
    return finish();
  }
  const whole = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
  if (
    m.format !== ARCHIVE_FORMAT ||
    typeof m.origin !== 'string' ||
    !whole(m.from) ||
    !whole(m.to) ||
    m.to <= m.from ||
    m.to % TILE_WIDTH !== 0 ||
    m.from % TILE_WIDTH !== 0 ||
    !/^[0-9a-f]{64}$/.test(String(m.rootHash)) ||
    !whole(m.head?.treeSize) ||
    m.head.treeSize < m.to ||
    !/^[0-9a-f]{64}$/.test(String(m.head?.rootHash)) ||
    !Array.isArray(m.files)
  ) {
    problem(`${MANIFEST_FILE} is not a ${ARCHIVE_FORMAT} manifest`);
    return finish();
  }
  const manifestSha = sha256(manifestBytes);
  Object.assign(report, {
    from: m.from,
    to: m.to,
    entries: m.to - m.from,
    manifestSha256: manifestSha.toString('hex'),
  });

  // 1. Files: every listed one as listed, nothing else.
  const listed = new Set<string>();
  for (const f of m.files) {
    const rel = String(f.path);
    listed.add(rel);
    const file = path.join(dir, rel);
    if (rel.includes('..') || path.isAbsolute(rel) || !fs.existsSync(file)) {
      problem(`file ${rel} is missing`);
      continue;
    }
    const got = await fileSha256(file);
    if (got.bytes !== f.bytes || got.sha256 !== f.sha256)
      problem(`file ${rel} does not match its SHA-256 in the manifest`);
  }
  for (const rel of listFiles(dir))
    if (!listed.has(rel) && rel !== MANIFEST_FILE && rel !== SUMS_FILE && rel !== NOTE_FILE)
      problem(`file ${rel} is not in the manifest`);

  // 2. The signed note, with the log's key when checking against the log, else the archive's own.
  let liveProof: ConsistencyProof | undefined;
  if (live) {
    try {
      liveProof = await live.consistency(m.to, m.head.treeSize);
    } catch {
      problem(`the log cannot prove its tree of size ${m.head.treeSize} extends one of size ${m.to}`);
    }
  }
  let vkey = live ? liveProof?.verifierKey : undefined;
  report.verifiedWith = live ? 'log' : 'archive';
  if (!vkey && !live) {
    try {
      vkey = fs.readFileSync(path.join(dir, VERIFIER_FILE), 'utf8').trim();
    } catch {
      problem(`${VERIFIER_FILE} is missing`);
    }
  }
  if (vkey) {
    let s: ArchiveStatement | undefined;
    try {
      s = parseArchiveStatement(verifyNote(fs.readFileSync(path.join(dir, NOTE_FILE), 'utf8'), [vkey]).text);
    } catch {
      s = undefined;
    }
    if (
      !s ||
      s.origin !== m.origin ||
      s.from !== m.from ||
      s.to !== m.to ||
      s.rootHash.toString('hex') !== m.rootHash ||
      !s.manifestSha256.equals(manifestSha)
    )
      problem(`${NOTE_FILE} does not verify with the checkpoint key or does not state this manifest`);
    try {
      const cp = parseCheckpoint(
        verifyNote(fs.readFileSync(path.join(dir, CHECKPOINT_FILE), 'utf8'), [vkey]).text,
      );
      if (
        cp.origin !== m.origin ||
        cp.size !== m.head.treeSize ||
        cp.rootHash.toString('hex') !== m.head.rootHash
      )
        problem(`${CHECKPOINT_FILE} is not the signed tree head the manifest names`);
    } catch {
      problem(`${CHECKPOINT_FILE} does not verify with the checkpoint key`);
    }
  }

  // 3. Entries against the level-0 tiles, and the tree of size `to` from the tiles.
  const tileFile = (level: number, index: number) => path.join(dir, tilePath(level, index));
  const built: { level: number; index: number; hashes: Buffer }[] = [];
  const builder = new TileBuilder((t) => {
    if (t.level > 0) built.push(t);
  });
  let tileProblem = false;
  let tile: Buffer | undefined;
  let seq = m.from;
  const readTile = (index: number) => {
    try {
      const b = fs.readFileSync(tileFile(0, index));
      if (b.length !== TILE_BYTES) throw new Error('size');
      return b;
    } catch {
      if (!tileProblem) problem(`tile ${tilePath(0, index)} is missing or not ${TILE_BYTES} bytes`);
      tileProblem = true;
      return undefined;
    }
  };
  for (let i = 0; i < m.from / TILE_WIDTH; i++) {
    const t = readTile(i);
    if (t) builder.addLeafTile(t, perfectRoot(t, TILE_WIDTH));
  }
  let entryProblem: string | undefined;
  if (fs.existsSync(path.join(dir, ENTRIES_FILE))) {
    for await (const line of lines(path.join(dir, ENTRIES_FILE))) {
      if (seq >= m.to) {
        entryProblem ??= `${ENTRIES_FILE} has more than ${m.to - m.from} entries`;
        break;
      }
      if (seq % TILE_WIDTH === 0) {
        if (tile) builder.addLeafTile(tile, perfectRoot(tile, TILE_WIDTH));
        tile = readTile(seq / TILE_WIDTH);
      }
      const off = (seq % TILE_WIDTH) * HASH_SIZE;
      if (tile && !leafHash(line).equals(tile.subarray(off, off + HASH_SIZE)))
        entryProblem ??= `entry ${seq} (line ${seq - m.from + 1} of ${ENTRIES_FILE}) does not match its leaf hash`;
      seq++;
    }
    if (tile) builder.addLeafTile(tile, perfectRoot(tile, TILE_WIDTH));
    if (seq < m.to)
      entryProblem ??= `${ENTRIES_FILE} has ${seq - m.from} entries, the manifest says ${m.to - m.from}`;
  } else entryProblem = `${ENTRIES_FILE} is missing`;
  if (entryProblem) problem(entryProblem);
  if (!tileProblem && builder.size === m.to) {
    if (builder.root().toString('hex') !== m.rootHash)
      problem(`the tree of size ${m.to} rebuilt from the tiles is not the manifest's root hash`);
    for (const t of built) {
      let stored: Buffer | undefined;
      try {
        stored = fs.readFileSync(tileFile(t.level, t.index));
      } catch {
        stored = undefined;
      }
      if (!stored?.equals(t.hashes)) {
        problem(`tile ${tilePath(t.level, t.index)} is missing or does not match the tiles below it`);
        break;
      }
    }
  }

  // 4. The consistency proof from `to` to the signed head.
  try {
    const c = JSON.parse(fs.readFileSync(path.join(dir, CONSISTENCY_FILE), 'utf8')) as ConsistencyFile;
    if (
      c.from !== m.to ||
      c.to !== m.head.treeSize ||
      c.fromRootHash !== m.rootHash ||
      c.toRootHash !== m.head.rootHash ||
      !Array.isArray(c.proof) ||
      !verifyConsistency(c.from, c.to, c.proof.map(hex), hex(c.fromRootHash), hex(c.toRootHash))
    )
      problem(`${CONSISTENCY_FILE} does not prove that the signed head extends the archived tree`);
  } catch {
    problem(`${CONSISTENCY_FILE} is missing or not JSON`);
  }

  // 5. Against the running log.
  if (live) {
    if (liveProof) {
      if (liveProof.from.rootHash !== m.rootHash)
        problem(`the log's tree head at size ${m.to} is not the archive's`);
      if (liveProof.to.rootHash !== m.head.rootHash)
        problem(`the log's tree head at size ${m.head.treeSize} is not the archive's signed head`);
    }
    if (live.archives) {
      const w = live.archives.find((a) => a.from === m.from && a.to === m.to);
      if (!w) problem(`the log has no record of an archive of entries ${m.from} to ${m.to - 1}`);
      else if (w.manifestSha256 !== manifestSha.toString('hex') || w.rootHash !== m.rootHash)
        problem(
          `the log's record of entries ${m.from} to ${m.to - 1} names another archive (manifest ${w.manifestSha256})`,
        );
    }
  }
  return finish();
}

// ---- archiving ----------------------------------------------------------------------------------------

export interface ArchiveOptions {
  /** The audit database, with a role that owns its tables (server), or the embedded database. */
  db: SqlDriver;
  /** The checkpoint signing key (`<data dir>/keys/audit-checkpoint.skey`) and the log's origin. */
  keyFile: string;
  origin: string;
  /** Where signed checkpoints are also written (CUSTOS_AUDIT_CHECKPOINT_DIR). */
  checkpointDir?: string;
  /** Archive entries older than this (itself at least `retentionYears` before `now`). */
  before: Date;
  retentionYears: number;
  /** The archive directory to create (must not exist, or be empty). */
  outDir: string;
  /** Archive entries a SIEM destination has not confirmed yet (they are in the archive). */
  allowUnforwarded?: boolean;
  now?: Date;
}

export interface ArchiveResult {
  archived: number;
  from: number;
  to: number;
  /** The archive directory (absent when nothing was archived). */
  dir?: string;
  manifestSha256?: string;
  rootHash?: string;
  head?: { treeSize: number; rootHash: string };
  /** Sequence number of the archive record (`audit.archived`) in the log. */
  recordSeq?: number;
  indexRowsRemoved?: number;
  /** Why archiving stopped where it did: the first kept entry and the reason. */
  stoppedAt: { seq: number; reason: string } | undefined;
  cutoff: string;
}

/**
 * `custos audit archive`: archives the oldest entries older than `before` (see the module comment).
 * Refuses (AuditArchiveError) a retention below six years, a `before` inside the retention period, a
 * log that does not verify over the range, or a non-empty output directory. Returns `archived: 0` when
 * no whole tile of entries qualifies.
 */
export async function archiveAuditLog(opts: ArchiveOptions): Promise<ArchiveResult> {
  checkRetentionYears(opts.retentionYears);
  const now = opts.now ?? new Date();
  const cutoff = retentionCutoff(now, opts.retentionYears);
  if (Number.isNaN(opts.before.getTime()))
    throw new AuditArchiveError('usage', '--before must be a date (YYYY-MM-DD) or an instant');
  if (opts.before.getTime() > cutoff.getTime())
    throw new AuditArchiveError(
      'retention',
      `--before ${opts.before.toISOString()} is within the retention period of ${opts.retentionYears} years (${RETENTION_RULE}): the youngest date allowed is ${cutoff.toISOString()}`,
    );
  const db = opts.db;
  const schema = await db.query<{ archive: string | null; tiles: string | null }>(
    "SELECT to_regclass('audit_archive')::text AS archive, to_regclass('audit_tile')::text AS tiles",
  );
  if (!schema.rows[0]?.archive || !schema.rows[0].tiles)
    throw new AuditArchiveError(
      'schema',
      'the audit database has no archive table (an older schema): run `custos audit setup` first',
    );
  if (!fs.existsSync(opts.keyFile))
    throw new AuditArchiveError(
      'usage',
      `no checkpoint signing key at ${opts.keyFile}: run the archive on the Custos host, with its data directory`,
    );
  const out = path.resolve(opts.outDir);
  if (fs.existsSync(out) && (!fs.statSync(out).isDirectory() || fs.readdirSync(out).length > 0))
    throw new AuditArchiveError('usage', `--out ${out} exists and is not an empty directory`);

  const signer = parseSignerKey(fs.readFileSync(opts.keyFile, 'utf8').trim());
  const verifierKey = formatVerifierKey(signer.name, signer.publicKeyRaw);
  const log = new AuditLog(db);
  const checkpoints = new Checkpoints({
    audit: log,
    keyFile: opts.keyFile,
    origin: opts.origin,
    exportDir: opts.checkpointDir,
  });
  const marks = await readArchiveWatermarks(db);
  const from = marks[marks.length - 1]?.to ?? 0;
  const role = await db.query<{ u: string; owns: boolean }>(
    `SELECT current_user AS u,
            coalesce((SELECT pg_has_role(current_user, tableowner, 'MEMBER') FROM pg_tables
                       WHERE schemaname = current_schema() AND tablename = 'audit_entry'), false) AS owns`,
  );
  const who = role.rows[0]!.u;
  if (!role.rows[0]!.owns)
    throw new AuditArchiveError(
      'usage',
      `role ${who} does not own the audit tables and cannot remove archived entries: use the role that ran custos audit setup`,
    );

  // The current head, signed; it also stores every tile the log has completed.
  const head = await checkpoints.checkpoint();

  // Entries from `from` while they are old enough, checked against their stored leaf hash and tile.
  const scan = await scanArchivable(db, from, head.treeSize, opts.before);
  const to = from + Math.floor((scan.end - from) / TILE_WIDTH) * TILE_WIDTH;
  const base = { from, to: from, archived: 0, cutoff: cutoff.toISOString(), stoppedAt: scan.stoppedAt };
  if (to <= from) {
    scan.discard();
    return base;
  }
  try {
    if (!opts.allowUnforwarded) await checkForwarded(db, to);
    fs.mkdirSync(out, { recursive: true, mode: 0o700 });
    const written = await writeArchive({
      out,
      db,
      checkpoints,
      head,
      from,
      to,
      scan,
      verifierKey,
      signer,
      origin: opts.origin,
      before: opts.before,
      retentionYears: opts.retentionYears,
      now,
      who,
    });
    // Read back and verify, against this log, before anything is deleted.
    const check = await verifyArchiveDir(out, { consistency: (a, b) => checkpoints.consistency(a, b) });
    if (!check.ok)
      throw new AuditArchiveError(
        'failed',
        `the archive written to ${out} does not verify (${check.problems[0]}); nothing was deleted`,
      );
    const removed = await removeArchived(db, {
      from,
      to,
      rootHash: written.rootHash,
      manifestSha256: written.manifestSha256,
      note: written.note,
      retentionYears: opts.retentionYears,
      who,
      before: opts.before,
    });
    return {
      ...base,
      to,
      archived: to - from,
      dir: out,
      manifestSha256: written.manifestSha256.toString('hex'),
      rootHash: written.rootHash.toString('hex'),
      head: { treeSize: head.treeSize, rootHash: head.rootHash },
      recordSeq: removed.recordSeq,
      indexRowsRemoved: removed.indexRows,
      stoppedAt:
        scan.end === to
          ? scan.stoppedAt
          : { seq: to, reason: 'archives end at a multiple of 256 entries (a whole tile)' },
    };
  } finally {
    scan.discard();
  }
}

interface Scan {
  /** The first entry not archivable (or the head size). */
  end: number;
  stoppedAt: { seq: number; reason: string } | undefined;
  /** Temporary file of the scanned entries, one per line, with the byte offset and hash state at every
   * 256th entry, so that the archive's entries file is a prefix of it. */
  file: string;
  boundaries: Map<number, { bytes: number; hash: Hash; oldest: string; youngest: string }>;
  discard(): void;
}

/** Stored entries [from, to) in order: COPY on a server, pages of rows otherwise. */
async function* entriesOf(
  db: SqlDriver,
  from: number,
  to: number,
): AsyncGenerator<{ seq: number; entry: Buffer; leafHash: Buffer }> {
  if (db.copyOut) {
    const sql = `SELECT seq, entry, leaf_hash FROM audit_entry WHERE seq >= ${Math.trunc(from)} AND seq < ${Math.trunc(to)} ORDER BY seq`;
    for await (const [seq, entry, leaf] of copyTuples(db.copyOut(sql)))
      yield { seq: Number(seq!.readBigInt64BE(0)), entry: entry!, leafHash: leaf! };
    return;
  }
  const PAGE = 2048;
  for (let at = from; at < to;) {
    const r = await db.query<{ seq: number; entry: Uint8Array; leaf_hash: Uint8Array }>(
      'SELECT seq, entry, leaf_hash FROM audit_entry WHERE seq >= $1 AND seq < $2 ORDER BY seq LIMIT $3',
      [at, to, PAGE],
    );
    for (const row of r.rows)
      yield { seq: Number(row.seq), entry: Buffer.from(row.entry), leafHash: Buffer.from(row.leaf_hash) };
    if (r.rows.length < PAGE) return;
    at = Number(r.rows[r.rows.length - 1]!.seq) + 1;
  }
}

/**
 * Reads the entries from `from` on while they are archivable (time and recorded_at before `before`, no
 * line break), checking each against its stored leaf hash and level-0 tile, into a temporary file.
 */
async function scanArchivable(db: SqlDriver, from: number, headSize: number, before: Date): Promise<Scan> {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'custos-archive-')), 'entries.part');
  const fd = fs.openSync(file, 'w', 0o600);
  const boundaries: Scan['boundaries'] = new Map();
  const h = createHash('sha256');
  let bytes = 0;
  let oldest = '';
  let youngest = '';
  let stoppedAt: Scan['stoppedAt'];
  let seq = from;
  const limit = before.getTime();
  // The first entry recorded (database clock) at or after `before` ends the range whatever its time.
  const young = await db.query<{ seq: number | null }>(
    'SELECT min(seq) AS seq FROM audit_entry WHERE seq >= $1 AND seq < $2 AND recorded_at >= $3',
    [from, headSize, before],
  );
  const youngSeq = young.rows[0]?.seq;
  const end = youngSeq === null || youngSeq === undefined ? headSize : Number(youngSeq);
  const tiles = new Map<number, Buffer>();
  const parts: Buffer[] = [];
  const flush = () => {
    if (parts.length > 0) bytes += fs.writeSync(fd, Buffer.concat(parts.splice(0)));
  };
  try {
    boundaries.set(from, { bytes: 0, hash: h.copy(), oldest, youngest });
    // One entry past `end`, to say why it ends there.
    for await (const row of entriesOf(db, from, Math.min(end + 1, headSize))) {
      if (row.seq !== seq)
        throw new AuditArchiveError('broken', `the audit log has no entry ${seq}: run custos audit verify`);
      const t = Math.floor(seq / TILE_WIDTH);
      if (!tiles.has(t)) {
        // The level-0 tiles of the next 65,536 entries, in one query.
        tiles.clear();
        const r = await db.query<{ idx: number; hashes: Uint8Array }>(
          'SELECT idx, hashes FROM audit_tile WHERE level = 0 AND idx >= $1 AND idx < $2',
          [t, t + 256],
        );
        for (const x of r.rows) tiles.set(Number(x.idx), Buffer.from(x.hashes));
      }
      const tile = tiles.get(t);
      const leaf = leafHash(row.entry);
      const off = (seq % TILE_WIDTH) * HASH_SIZE;
      if (!leaf.equals(row.leafHash) || (tile && !leaf.equals(tile.subarray(off, off + HASH_SIZE))))
        throw new AuditArchiveError(
          'broken',
          `audit entry ${seq} does not match its leaf hash: run custos audit verify; nothing was archived`,
        );
      let time = Number.NaN;
      try {
        const v = (JSON.parse(row.entry.toString('utf8')) as { time?: unknown }).time;
        if (typeof v === 'string') time = Date.parse(v);
      } catch {
        /* not archivable: below */
      }
      const reason = Number.isNaN(time)
        ? 'its time cannot be read'
        : time >= limit
          ? 'it is not older than --before'
          : seq === end
            ? 'it was recorded (recorded_at) after --before'
            : row.entry.includes(0x0a) || row.entry.includes(0x0d)
              ? 'it holds a line break'
              : undefined;
      if (reason) {
        stoppedAt = { seq, reason };
        break;
      }
      const iso = new Date(time).toISOString();
      if (!oldest || iso < oldest) oldest = iso;
      if (!youngest || iso > youngest) youngest = iso;
      parts.push(row.entry, NEWLINE);
      h.update(row.entry).update(NEWLINE);
      seq++;
      if (seq % TILE_WIDTH === 0) {
        flush();
        boundaries.set(seq, { bytes, hash: h.copy(), oldest, youngest });
      }
    }
    flush();
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
    throw e;
  }
  fs.closeSync(fd);
  return {
    end: seq,
    stoppedAt,
    file,
    boundaries,
    discard: () => fs.rmSync(path.dirname(file), { recursive: true, force: true }),
  };
}

const NEWLINE = Buffer.from('\n');

/** Refuses to archive entries a SIEM destination has not confirmed (its cursor is below `to`). */
async function checkForwarded(db: SqlQueryable, to: number): Promise<void> {
  const t = await db.query<{ t: string | null }>("SELECT to_regclass('audit_siem_cursor')::text AS t");
  if (!t.rows[0]?.t) return;
  const r = await db.query<{ destination: string; next_seq: number }>(
    `SELECT destination, max(next_seq) AS next_seq FROM audit_siem_cursor GROUP BY destination
      HAVING max(next_seq) < $1 ORDER BY destination`,
    [to],
  );
  const behind = r.rows[0];
  if (behind)
    throw new AuditArchiveError(
      'unforwarded',
      `SIEM destination ${behind.destination} has confirmed entries up to ${Number(behind.next_seq)} only: let forwarding catch up, or pass --allow-unforwarded (the entries are in the archive either way)`,
    );
}

async function writeArchive(a: {
  out: string;
  db: SqlQueryable;
  checkpoints: Checkpoints;
  head: { treeSize: number; rootHash: string; note: string };
  from: number;
  to: number;
  scan: Scan;
  verifierKey: string;
  signer: ReturnType<typeof parseSignerKey>;
  origin: string;
  before: Date;
  retentionYears: number;
  now: Date;
  who: string;
}): Promise<{ rootHash: Buffer; manifestSha256: Buffer; note: string }> {
  const files: ArchiveManifest['files'] = [];
  const put = (rel: string, data: Buffer | string) => {
    const file = path.join(a.out, rel);
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    fs.writeFileSync(file, data, { mode: 0o600, flag: 'wx' });
    const b = Buffer.isBuffer(data) ? data : Buffer.from(data, 'utf8');
    files.push({ path: rel, bytes: b.length, sha256: sha256(b).toString('hex') });
  };

  // Entries: the scanned file cut at `to`.
  const cut = a.scan.boundaries.get(a.to)!;
  try {
    fs.renameSync(a.scan.file, path.join(a.out, ENTRIES_FILE));
  } catch {
    fs.copyFileSync(a.scan.file, path.join(a.out, ENTRIES_FILE), fs.constants.COPYFILE_EXCL);
  }
  fs.truncateSync(path.join(a.out, ENTRIES_FILE), cut.bytes);
  fs.chmodSync(path.join(a.out, ENTRIES_FILE), 0o600);
  files.push({ path: ENTRIES_FILE, bytes: cut.bytes, sha256: cut.hash.copy().digest('hex') });

  // Tiles: every full tile of the tree of size `to`, as stored; and the tree head rebuilt from level 0.
  const builder = new TileBuilder();
  for (let level = 0; TILE_WIDTH ** (level + 1) <= a.to; level++) {
    const count = Math.floor(a.to / TILE_WIDTH ** (level + 1));
    for (let idx = 0; idx < count;) {
      const r = await a.db.query<{ idx: number; hashes: Uint8Array }>(
        'SELECT idx, hashes FROM audit_tile WHERE level = $1 AND idx >= $2 AND idx < $3 ORDER BY idx',
        [level, idx, Math.min(count, idx + 256)],
      );
      for (const row of r.rows) {
        if (Number(row.idx) !== idx) break;
        const hashes = Buffer.from(row.hashes);
        put(tilePath(level, idx), hashes);
        if (level === 0) builder.addLeafTile(hashes, perfectRoot(hashes, TILE_WIDTH));
        idx++;
      }
      if (r.rows.length === 0 || Number(r.rows[r.rows.length - 1]!.idx) !== idx - 1)
        throw new AuditArchiveError(
          'broken',
          `stored tile ${tilePath(level, idx)} is missing: run custos audit verify`,
        );
    }
  }
  const rootHash = builder.root();

  // The signed head and the proof that it extends the archived tree (checked by checkpoints.ts).
  const proof = await a.checkpoints.consistency(a.to, a.head.treeSize);
  if (proof.from.rootHash !== rootHash.toString('hex') || proof.to.rootHash !== a.head.rootHash)
    throw new AuditArchiveError(
      'broken',
      'the stored tiles do not give the signed tree head: run custos audit verify',
    );
  put(CHECKPOINT_FILE, a.head.note);
  const consistency: ConsistencyFile = {
    from: a.to,
    to: a.head.treeSize,
    fromRootHash: proof.from.rootHash,
    toRootHash: proof.to.rootHash,
    proof: proof.proof,
  };
  put(CONSISTENCY_FILE, `${JSON.stringify(consistency, null, 2)}\n`);
  put(VERIFIER_FILE, `${a.verifierKey}\n`);

  const manifest: ArchiveManifest = {
    format: ARCHIVE_FORMAT,
    origin: a.origin,
    from: a.from,
    to: a.to,
    rootHash: rootHash.toString('hex'),
    head: { treeSize: a.head.treeSize, rootHash: a.head.rootHash },
    oldestEntryTime: cut.oldest,
    youngestEntryTime: cut.youngest,
    before: a.before.toISOString(),
    retentionYears: a.retentionYears,
    createdAt: a.now.toISOString(),
    createdBy: a.who,
    files,
  };
  const manifestText = `${JSON.stringify(manifest, null, 2)}\n`;
  fs.writeFileSync(path.join(a.out, MANIFEST_FILE), manifestText, { mode: 0o600, flag: 'wx' });
  const manifestSha256 = sha256(manifestText);
  // `sha256sum -c SHA256SUMS` checks the manifest and every file it lists.
  const sums = [...files, { path: MANIFEST_FILE, sha256: manifestSha256.toString('hex') }]
    .map((f) => `${f.sha256}  ${f.path}\n`)
    .join('');
  fs.writeFileSync(path.join(a.out, SUMS_FILE), sums, { mode: 0o600, flag: 'wx' });
  const note = signNote(
    formatArchiveStatement({ origin: a.origin, from: a.from, to: a.to, rootHash, manifestSha256 }),
    a.signer.name,
    a.signer.privateKey,
  );
  fs.writeFileSync(path.join(a.out, NOTE_FILE), note, { mode: 0o600, flag: 'wx' });
  return { rootHash, manifestSha256, note };
}

/**
 * The one transaction that removes archived entries: under the sequencer's lock, append the archive
 * record, insert the watermark (its trigger checks the range), set the session marker the delete
 * triggers look for, delete the range's index rows and entries.
 */
async function removeArchived(
  db: SqlDriver,
  a: {
    from: number;
    to: number;
    rootHash: Buffer;
    manifestSha256: Buffer;
    note: string;
    retentionYears: number;
    who: string;
    before: Date;
  },
): Promise<{ recordSeq: number; indexRows: number }> {
  return db.transaction(async (tx) => {
    await tx.query('SET TRANSACTION ISOLATION LEVEL READ COMMITTED');
    await tx.query(`SELECT ${SEQUENCE_LOCK}`);
    const mark = await tx.query<{ m: number | null }>('SELECT max(archived_before) AS m FROM audit_archive');
    if (Number(mark.rows[0]?.m ?? 0) !== a.from)
      throw new AuditArchiveError(
        'failed',
        'another archive ran meanwhile; nothing was deleted: run this one again',
      );
    const check = await tx.query<{ n: number; young: number }>(
      `SELECT count(*)::int AS n, count(*) FILTER (WHERE recorded_at >= $3)::int AS young
         FROM audit_entry WHERE seq >= $1 AND seq < $2`,
      [a.from, a.to, a.before],
    );
    if (Number(check.rows[0]!.n) !== a.to - a.from || Number(check.rows[0]!.young) !== 0)
      throw new AuditArchiveError('broken', 'the archived range changed meanwhile; nothing was deleted');
    const event: AuditEvent = {
      ...adminEvent('audit.archived', {
        requestId: randomUUID(),
        userId: a.who,
        count: a.to - a.from,
      }),
      resource: { type: 'AuditArchive', id: `${a.from}-${a.to}`, version: a.manifestSha256.toString('hex') },
    };
    const entry = encodeAuditEvent(event);
    const next = await tx.query<{ n: number }>('SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_entry');
    const recordSeq = Number(next.rows[0]!.n);
    await tx.query(
      'INSERT INTO audit_entry (seq, entry, leaf_hash, request_id, phase) VALUES ($1, $2, $3, $4, $5)',
      [recordSeq, entry, leafHash(entry), event.requestId, event.phase],
    );
    const rows = indexRowsOf(event).map((r) => ({ ...r, seq: recordSeq }));
    await tx.query(
      `INSERT INTO audit_index (${INDEX_COLUMNS}) SELECT * FROM ${unnestIndexColumns(1)}`,
      indexColumns(rows),
    );
    await tx.query(
      `INSERT INTO audit_archive (archived_before, archived_from, root_hash, manifest_sha256, note, record_seq, retention_years)
       VALUES ($1, $2, $3, $4, $5, $6, $7)`,
      [a.to, a.from, a.rootHash, a.manifestSha256, a.note, recordSeq, a.retentionYears],
    );
    await tx.query('SELECT set_config($1, $2, true)', [ARCHIVE_SETTING, String(a.to)]);
    const idx = await tx.query<{ n: number }>(
      'WITH d AS (DELETE FROM audit_index WHERE seq >= $1 AND seq < $2 RETURNING 1) SELECT count(*)::int AS n FROM d',
      [a.from, a.to],
    );
    const ent = await tx.query<{ n: number }>(
      'WITH d AS (DELETE FROM audit_entry WHERE seq >= $1 AND seq < $2 RETURNING 1) SELECT count(*)::int AS n FROM d',
      [a.from, a.to],
    );
    if (Number(ent.rows[0]!.n) !== a.to - a.from)
      throw new AuditArchiveError('failed', 'not every archived entry could be removed; nothing was deleted');
    return { recordSeq, indexRows: Number(idx.rows[0]!.n) };
  });
}

// ---- the command ------------------------------------------------------------------------------------

/** Maps a database error to one line with its SQLSTATE only (a server message may quote values). */
function databaseError(e: unknown, doing: string): AuditArchiveError {
  const code = (e as { code?: unknown } | null)?.code;
  if (code === '42501')
    return new AuditArchiveError(
      'usage',
      `the database role lacks a privilege for ${doing} (SQLSTATE 42501): use the role that ran custos audit setup; nothing was deleted`,
    );
  if (code === 'P0001') {
    // Our triggers' messages (ARCHIVE_MIGRATION_SQL) are fixed text: shown; anything else is not.
    const m = e instanceof Error ? e.message : '';
    const ours =
      /^(audit entries|an audit archive|the stored Merkle tiles|the archive record)[^\n]{0,200}$/.test(m);
    return new AuditArchiveError(
      'failed',
      `the audit database refused ${doing} (SQLSTATE P0001${ours ? `: ${m}` : ''}); nothing was deleted`,
    );
  }
  if (typeof code === 'string' && /^(ECONN|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|EHOST|ENET|08|57P)/.test(code))
    return new AuditArchiveError(
      'failed',
      `lost or could not open the connection to the audit database (${code})`,
    );
  if (code === '28P01' || code === '28000')
    return new AuditArchiveError('usage', `the audit database refused the credentials (SQLSTATE ${code})`);
  return new AuditArchiveError(
    'failed',
    `${doing} failed${typeof code === 'string' ? ` (${code})` : ''}; nothing was deleted unless the archive record says so`,
  );
}

/**
 * `custos audit archive` from the configuration: opens the audit database with `adminUrl` (a server:
 * required, and it must be the configured audit database) or the embedded one (no roles; refused
 * while a server has it open), prepares nothing else, archives, closes.
 */
export async function archiveCommand(c: {
  auditDatabaseUrl: string | undefined;
  adminUrl: string | undefined;
  /** The embedded audit database's directory (`<data dir>/audit`). */
  embeddedDir: string;
  /** A server runs on this data directory (it holds the embedded database open). */
  serverRunning: boolean;
  keyFile: string;
  origin: string;
  checkpointDir: string | undefined;
  retentionYears: number;
  before: string;
  out: string;
  allowUnforwarded: boolean;
  /** Brings the embedded database's schema up to date, as a start would (audit-migrations.ts). */
  prepareEmbedded: (db: SqlDriver) => Promise<void>;
}): Promise<ArchiveResult> {
  checkRetentionYears(c.retentionYears);
  const before = parseArchiveBefore(c.before);
  if (!before)
    throw new AuditArchiveError(
      'usage',
      '--before must be a date (YYYY-MM-DD, midnight UTC) or an instant with a zone (2019-06-30T00:00:00Z)',
    );
  let db: SqlDriver;
  if (c.auditDatabaseUrl) {
    if (!c.adminUrl)
      throw new AuditArchiveError(
        'usage',
        '--admin-url is required with a PostgreSQL audit database: the role that ran custos audit setup (the application role cannot delete)',
      );
    let admin: URL;
    try {
      admin = new URL(c.adminUrl);
    } catch {
      throw new AuditArchiveError(
        'usage',
        '--admin-url is not a URL (expected postgres://user@host:port/database)',
      );
    }
    if (admin.protocol !== 'postgres:' && admin.protocol !== 'postgresql:')
      throw new AuditArchiveError('usage', '--admin-url must start with postgres:// or postgresql://');
    const where = (u: URL) =>
      `${u.hostname === 'localhost' ? '127.0.0.1' : u.hostname}:${u.port || '5432'}${u.pathname}`;
    if (where(admin) !== where(new URL(c.auditDatabaseUrl)))
      throw new AuditArchiveError(
        'usage',
        `--admin-url names ${where(admin)}, but the configured audit database (CUSTOS_AUDIT_DATABASE_URL) is ${where(new URL(c.auditDatabaseUrl))}`,
      );
    try {
      db = await PgDriver.open(c.adminUrl, { max: 2 });
    } catch (e) {
      throw databaseError(e, 'connecting');
    }
  } else {
    if (c.adminUrl)
      throw new AuditArchiveError(
        'usage',
        '--admin-url is for a PostgreSQL audit database; this one is embedded (it has no roles)',
      );
    if (c.serverRunning)
      throw new AuditArchiveError(
        'usage',
        'a server runs on this data directory and holds the embedded audit database: stop it first',
      );
    db = await PgliteDriver.open(c.embeddedDir);
    try {
      await c.prepareEmbedded(db);
    } catch (e) {
      await db.close().catch(() => {});
      throw e;
    }
  }
  try {
    return await archiveAuditLog({
      db,
      keyFile: c.keyFile,
      origin: c.origin,
      checkpointDir: c.checkpointDir,
      before,
      retentionYears: c.retentionYears,
      outDir: c.out,
      allowUnforwarded: c.allowUnforwarded,
    });
  } catch (e) {
    if (e instanceof AuditArchiveError) throw e;
    throw databaseError(e, 'archiving');
  } finally {
    await db.close().catch(() => {});
  }
}

/** One paragraph for people: what `archiveCommand` did. */
export function archiveSummary(r: ArchiveResult): string {
  const stop = r.stoppedAt
    ? ` Archiving stops at sequence number ${r.stoppedAt.seq}: ${r.stoppedAt.reason}.`
    : '';
  if (r.archived === 0)
    return `nothing archived: fewer than 256 entries from sequence number ${r.from} on are older than --before (entries are archived in whole tiles of 256).${stop}`;
  return (
    `archived entries ${r.from} to ${r.to - 1} (${r.archived}) to ${r.dir}: manifest SHA-256 ${r.manifestSha256}, ` +
    `tree head at ${r.to} ${r.rootHash}, linked to the signed checkpoint of tree size ${r.head!.treeSize}; ` +
    `the archive record is sequence number ${r.recordSeq}; ${r.indexRowsRemoved} query index row(s) removed.${stop}`
  );
}
