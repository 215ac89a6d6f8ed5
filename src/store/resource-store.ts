import type { SqlDriver, SqlQueryable } from './sql-driver.ts';
import type { BoundedQueries } from './pg/pg-driver.ts';
import { CustosError } from '../kernel/errors.ts';
import type { SearchIndex } from '../fhir/search-index.ts';
import { INDEX_VERSION } from '../fhir/search-parameters.ts';

/** A version of a resource as stored. `json` is the resource text with `meta.versionId`/`lastUpdated` set. */
export interface StoredVersion {
  resourceType: string;
  id: string;
  versionId: number;
  lastUpdated: string;
  deleted: boolean;
  method: string;
  /** The resource's JSON text; undefined for a deletion. */
  json: string | undefined;
  patients: string[];
  /** Set on versions about to be written (prepareFresh); not read back from the database. */
  index?: SearchIndex;
  /** Sealed protected elements per class (src/crypto/envelope.ts); `json` then holds placeholders. */
  sealed?: Record<string, string>;
}

export interface Project {
  id: string;
  name: string;
  kind: 'sandbox' | 'production';
  provenanceEnabled: boolean;
}

export interface WriteInput {
  projectId: string;
  resourceType: string;
  id: string;
  method: 'create' | 'update' | 'patch' | 'delete';
  /** The resource to store (meta is overwritten); undefined for a delete. */
  resource: Record<string, unknown> | undefined;
  patients: string[];
  /**
   * The search index of `resource` (empty for a delete), written with it in the same transaction;
   * undefined when extraction is off (the row is then stale for `custos reindex`).
   */
  index: SearchIndex | undefined;
  /**
   * Seals the protected elements for the version number the store assigns (the ciphertexts bind
   * it); `resource` is then the redacted form, stored as is.
   */
  seal?: (versionId: number) => Record<string, string> | undefined;
  /** When set, the write fails with VERSION_CONFLICT unless the current version is this one. */
  expectedVersion?: number;
  lastUpdated: string;
}

interface Row {
  resource_type: string;
  id: string;
  version_id: number;
  last_updated: string | Date;
  deleted: boolean;
  method?: string;
  json: string | null;
  patients: string[];
  sealed?: Record<string, string> | null;
}

function toVersion(r: Row): StoredVersion {
  return {
    resourceType: r.resource_type,
    id: r.id,
    versionId: Number(r.version_id),
    lastUpdated:
      r.last_updated instanceof Date ? r.last_updated.toISOString() : new Date(r.last_updated).toISOString(),
    deleted: r.deleted,
    method: r.method ?? (r.deleted ? 'delete' : 'update'),
    json: r.json ?? undefined,
    patients: r.patients ?? [],
    sealed: r.sealed ?? undefined,
  };
}

/** The stored text of a version: id, type and version are the server's, whatever the body said
 * (a create ignores a body id). */
function resourceJson(
  type: string,
  id: string,
  versionId: number,
  lastUpdated: string,
  resource: Record<string, unknown>,
): string {
  const { resourceType: _type, id: _id, meta: bodyMeta, ...rest } = resource;
  const meta = {
    ...((bodyMeta as Record<string, unknown> | undefined) ?? {}),
    versionId: String(versionId),
    lastUpdated,
  };
  return JSON.stringify({ resourceType: type, id, meta, ...rest });
}

const COLS = 'resource_type, id, version_id, last_updated, deleted, content::text AS json, patients, sealed';

/**
 * The resource store. Only the PHI gateway may import it (DESIGN.md rule 1; enforced by
 * eslint.config.js and proven by test/dependency-rule.test.ts). Every query is scoped by project.
 */
export class ResourceStore {
  constructor(readonly db: SqlDriver) {}

  /**
   * Where a search runs its statements: outside any transaction (they only read, and each sees
   * committed data, as in a READ COMMITTED transaction), each bounded by `timeoutMs` on a
   * PostgreSQL server (a statement running longer is cancelled: SQLSTATE 57014). PGlite cannot
   * cancel a statement (one in-process connection), so there the bound is the search limits alone.
   */
  searchQueries(timeoutMs: number | undefined): SqlQueryable {
    const db = this.db as SqlDriver & Partial<BoundedQueries>;
    return timeoutMs && db.bounded ? db.bounded(timeoutMs) : db;
  }

  async getProject(id: string): Promise<Project | undefined> {
    const r = await this.db.query<{
      id: string;
      name: string;
      kind: 'sandbox' | 'production';
      provenance_enabled: boolean;
    }>('SELECT id, name, kind, provenance_enabled FROM project WHERE id = $1', [id]);
    const p = r.rows[0];
    return p && { id: p.id, name: p.name, kind: p.kind, provenanceEnabled: p.provenance_enabled };
  }

  async read(
    projectId: string,
    type: string,
    id: string,
    q: SqlQueryable = this.db,
  ): Promise<StoredVersion | undefined> {
    // The commonest statement of all (every read, and the current version of every update): prepared
    // once per connection on a server, so each read skips PostgreSQL's parse and plan.
    const r = await q.query<Row>(
      `SELECT ${COLS} FROM resource WHERE project_id = $1 AND resource_type = $2 AND id = $3`,
      [projectId, type, id],
      { name: 'custos_read' },
    );
    return r.rows[0] && toVersion(r.rows[0]);
  }

  async vread(
    projectId: string,
    type: string,
    id: string,
    versionId: number,
  ): Promise<StoredVersion | undefined> {
    const r = await this.db.query<Row>(
      `SELECT ${COLS}, method FROM resource_version WHERE project_id = $1 AND resource_type = $2 AND id = $3 AND version_id = $4`,
      [projectId, type, id, versionId],
      { name: 'custos_vread' },
    );
    return r.rows[0] && toVersion(r.rows[0]);
  }

  /**
   * Versions newest first: of one resource, of a type, or of the whole project. `before` is a
   * keyset cursor (the last entry of the previous page), so pages stay correct while data changes.
   */
  async history(
    projectId: string,
    opts: {
      type?: string;
      id?: string;
      since?: string;
      count: number;
      before?: { lastUpdated: string; type: string; id: string; versionId: number };
    },
  ): Promise<StoredVersion[]> {
    const where = ['project_id = $1'];
    const params: unknown[] = [projectId];
    if (opts.type) where.push(`resource_type = $${params.push(opts.type)}`);
    if (opts.id) where.push(`id = $${params.push(opts.id)}`);
    if (opts.since) where.push(`last_updated >= $${params.push(opts.since)}`);
    if (opts.before) {
      const b = opts.before;
      where.push(
        `(last_updated, resource_type, id, version_id) < ($${params.push(b.lastUpdated)}::timestamptz, $${params.push(b.type)}, $${params.push(b.id)}, $${params.push(b.versionId)})`,
      );
    }
    const r = await this.db.query<Row>(
      `SELECT ${COLS}, method FROM resource_version WHERE ${where.join(' AND ')}
       ORDER BY last_updated DESC, resource_type DESC, id DESC, version_id DESC LIMIT $${params.push(opts.count)}`,
      params,
    );
    return r.rows.map(toVersion);
  }

  /**
   * Serializes conditional writes on the same condition until `q`'s transaction ends (a
   * transaction-scoped advisory lock; re-entrant; a no-op in effect on single-connection PGlite).
   */
  async lockCondition(q: SqlQueryable, key: string): Promise<void> {
    await q.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [key]);
  }

  /**
   * Version 1 of a resource whose id the server just generated, built without writing it:
   * `insertFresh` writes many such versions in one statement (transaction bundles).
   */
  prepareFresh(w: WriteInput): StoredVersion {
    return {
      resourceType: w.resourceType,
      id: w.id,
      versionId: 1,
      lastUpdated: w.lastUpdated,
      deleted: false,
      method: 'create',
      json: w.resource ? resourceJson(w.resourceType, w.id, 1, w.lastUpdated, w.resource) : undefined,
      patients: w.patients,
      index: w.index,
      sealed: w.seal?.(1),
    };
  }

  /** Writes versions made by `prepareFresh` (history and current rows) in one statement. */
  async insertFresh(q: SqlQueryable, projectId: string, versions: readonly StoredVersion[]): Promise<void> {
    if (versions.length === 0) return;
    await q.query(
      `WITH fresh AS (
         SELECT * FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[], $8::int[], $9::text[])
           AS f(resource_type, id, last_updated, content, patients, search_keys, index_version, sealed)
       ), history AS (
         INSERT INTO resource_version (project_id, resource_type, id, version_id, last_updated, deleted, method, content, patients, sealed)
         SELECT $1, resource_type, id, 1, last_updated, false, 'create', content::jsonb,
                ARRAY(SELECT jsonb_array_elements_text(patients::jsonb)), sealed::jsonb FROM fresh)
       INSERT INTO resource (project_id, resource_type, id, version_id, last_updated, deleted, content, patients, search_keys, index_version, sealed)
       SELECT $1, resource_type, id, 1, last_updated, false, content::jsonb,
              ARRAY(SELECT jsonb_array_elements_text(patients::jsonb)),
              ARRAY(SELECT jsonb_array_elements_text(search_keys::jsonb)), index_version, sealed::jsonb FROM fresh`,
      [
        projectId,
        versions.map((v) => v.resourceType),
        versions.map((v) => v.id),
        versions.map((v) => v.lastUpdated),
        versions.map((v) => v.json ?? null),
        versions.map((v) => JSON.stringify(v.patients)),
        versions.map((v) => JSON.stringify(v.index?.keys ?? [])),
        versions.map((v) => (v.index ? INDEX_VERSION : 0)),
        versions.map((v) => (v.sealed ? JSON.stringify(v.sealed) : null)),
      ],
    );
    await writeIndexRows(
      q,
      projectId,
      versions.map((v) => ({ type: v.resourceType, id: v.id, index: v.index })),
      false,
    );
  }

  /**
   * Writes the next version of a resource inside `q`'s transaction. With `fresh`, the id was just
   * generated by the server, so no earlier version can exist: version 1 is written in one statement
   * without first locking a current row (creates are the common case).
   */
  async write(q: SqlQueryable, w: WriteInput & { fresh?: boolean }): Promise<StoredVersion> {
    const prev = w.fresh
      ? undefined
      : (
          await q.query<{ version_id: number; deleted: boolean }>(
            'SELECT version_id, deleted FROM resource WHERE project_id = $1 AND resource_type = $2 AND id = $3 FOR UPDATE',
            [w.projectId, w.resourceType, w.id],
          )
        ).rows[0];
    if (w.expectedVersion !== undefined && (!prev || Number(prev.version_id) !== w.expectedVersion)) {
      throw new CustosError('VERSION_CONFLICT');
    }
    const versionId = prev ? Number(prev.version_id) + 1 : 1;
    const json = w.resource
      ? resourceJson(w.resourceType, w.id, versionId, w.lastUpdated, w.resource)
      : undefined;
    const deleted = w.resource === undefined;
    const sealed = deleted ? undefined : w.seal?.(versionId);
    const sealedJson = sealed ? JSON.stringify(sealed) : null;
    // One statement writes the history row and the current row.
    await q.query(
      `WITH history AS (
         INSERT INTO resource_version (project_id, resource_type, id, version_id, last_updated, deleted, method, content, patients, sealed)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $12::jsonb))
       INSERT INTO resource (project_id, resource_type, id, version_id, last_updated, deleted, content, patients, search_keys, index_version, sealed)
       VALUES ($1, $2, $3, $4, $5, $6, $8::jsonb, $9, $10, $11, $12::jsonb)
       ON CONFLICT (project_id, resource_type, id) DO UPDATE SET version_id = EXCLUDED.version_id,
         last_updated = EXCLUDED.last_updated, deleted = EXCLUDED.deleted, content = EXCLUDED.content,
         patients = EXCLUDED.patients, search_keys = EXCLUDED.search_keys, index_version = EXCLUDED.index_version,
         sealed = EXCLUDED.sealed`,
      [
        w.projectId,
        w.resourceType,
        w.id,
        versionId,
        w.lastUpdated,
        deleted,
        w.method,
        json ?? null,
        w.patients,
        deleted ? [] : (w.index?.keys ?? []),
        deleted || w.index ? INDEX_VERSION : 0,
        sealedJson,
      ],
    );
    await writeIndexRows(
      q,
      w.projectId,
      [{ type: w.resourceType, id: w.id, index: deleted ? undefined : w.index }],
      !w.fresh,
    );
    return {
      resourceType: w.resourceType,
      id: w.id,
      versionId,
      lastUpdated: w.lastUpdated,
      deleted,
      method: w.method,
      json,
      patients: w.patients,
      sealed,
    };
  }
}

/**
 * Writes the side-table index rows (strings, dates, numbers) of resources in one statement,
 * replacing what an earlier version wrote when `replace` is set. The only writer of these tables.
 */
export async function writeIndexRows(
  q: SqlQueryable,
  projectId: string,
  entries: readonly { type: string; id: string; index: SearchIndex | undefined }[],
  replace: boolean,
): Promise<void> {
  // Column arrays for unnest(): one multi-row INSERT per table.
  const cols = <K extends string>(...names: K[]) =>
    Object.fromEntries(names.map((k) => [k, [] as unknown[]])) as Record<K, unknown[]>;
  const push = <K extends string>(c: Record<K, unknown[]>, row: Partial<Record<K, unknown>>) => {
    for (const k of Object.keys(c) as K[]) c[k].push(row[k] ?? null);
  };
  const s = cols('type', 'id', 'code', 'norm', 'exact');
  const d = cols('type', 'id', 'code', 'lo', 'hi', 'comp');
  const n = cols('type', 'id', 'code', 'num', 'system', 'qcode', 'unit', 'comp');
  for (const { type, id, index } of entries) {
    for (const x of index?.strings ?? []) push(s, { type, id, ...x });
    for (const x of index?.dates ?? []) push(d, { type, id, ...x });
    for (const x of index?.numbers ?? []) push(n, { type, id, ...x });
  }
  const parts: string[] = [];
  const params: unknown[] = [projectId];
  const p = (v: unknown) => `$${params.push(v)}`;
  if (replace) {
    const types = p(entries.map((e) => e.type));
    const ids = p(entries.map((e) => e.id));
    for (const table of ['search_string', 'search_date', 'search_number'])
      parts.push(
        `del_${table} AS (DELETE FROM ${table} t USING unnest(${types}::text[], ${ids}::text[]) AS k(resource_type, id)
          WHERE t.project_id = $1 AND t.resource_type = k.resource_type AND t.id = k.id)`,
      );
  }
  if (s.id.length > 0)
    parts.push(
      `ins_string AS (INSERT INTO search_string (project_id, resource_type, id, code, norm, exact)
        SELECT $1, * FROM unnest(${p(s.type)}::text[], ${p(s.id)}::text[], ${p(s.code)}::text[], ${p(s.norm)}::text[], ${p(s.exact)}::text[]))`,
    );
  if (d.id.length > 0)
    parts.push(
      `ins_date AS (INSERT INTO search_date (project_id, resource_type, id, code, lo, hi, comp)
        SELECT $1, * FROM unnest(${p(d.type)}::text[], ${p(d.id)}::text[], ${p(d.code)}::text[], ${p(d.lo)}::timestamptz[], ${p(d.hi)}::timestamptz[], ${p(d.comp)}::text[]))`,
    );
  if (n.id.length > 0)
    parts.push(
      `ins_number AS (INSERT INTO search_number (project_id, resource_type, id, code, num, system, qcode, unit, comp)
        SELECT $1, * FROM unnest(${p(n.type)}::text[], ${p(n.id)}::text[], ${p(n.code)}::text[], ${p(n.num)}::numeric[], ${p(n.system)}::text[], ${p(n.qcode)}::text[], ${p(n.unit)}::text[], ${p(n.comp)}::text[]))`,
    );
  if (parts.length === 0) return;
  await q.query(`WITH ${parts.join(',\n')} SELECT 1`, params);
}
