import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import { newId } from '../kernel/ids.ts';
import { extractSearchIndex } from '../fhir/search-index.ts';
import { INDEX_VERSION } from '../fhir/search-parameters.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import { writeIndexRows } from '../store/resource-store.ts';
import { blindIndexKey, type Envelope } from '../crypto/envelope.ts';
import {
  restoreProtected,
  splitProtected,
  type PolicyRule,
  type ProtectedElement,
  type SensitivityClass,
} from '../crypto/protection-policy.ts';

export interface ReindexResult {
  /** Resources whose index was rebuilt by this run. */
  reindexed: number;
  /** Stale resources left (0 when the run finished). */
  remaining: number;
  indexVersion: number;
}

/**
 * `custos reindex`: rebuilds the search index of every resource whose index is stale (written by
 * an older extraction, with indexing off, or marked stale by `all`). Each batch commits on its
 * own, so an interrupted run resumes where it stopped: the stale rows are exactly what is left.
 * It goes through the same extractor and the same index writer as every write. Audited as an
 * administrative action (start and end); it reads resources but returns none.
 */
export async function reindex(
  deps: {
    db: SqlDriver;
    audit: AuditLog;
    baseUrl: string;
    /** With encryption: sealed elements are opened to rebuild their blind-index keys (never plaintext rows). */
    encryption?: { envelope: Envelope; policy: readonly PolicyRule[] };
  },
  opts: { all?: boolean; batch?: number; requestId?: string } = {},
): Promise<ReindexResult> {
  const batch = Math.min(Math.max(opts.batch ?? 500, 1), 10_000);
  const requestId = opts.requestId ?? newId();
  const event = (code: string, count?: number) => deps.audit.append(adminEvent(code, { requestId, count }));
  await event('search.reindex_started');
  if (opts.all) await deps.db.query('UPDATE resource SET index_version = 0 WHERE index_version <> 0');
  let reindexed = 0;
  for (;;) {
    const done = await deps.db.transaction(async (q) => {
      const rows = await q.query<{
        project_id: string;
        resource_type: string;
        id: string;
        version_id: number;
        json: string | null;
        sealed: Record<string, string> | null;
      }>(
        `SELECT project_id, resource_type, id, version_id, content::text AS json, sealed FROM resource
          WHERE index_version < $1 ORDER BY project_id, resource_type, id LIMIT $2 FOR UPDATE SKIP LOCKED`,
        [INDEX_VERSION, batch],
      );
      const byProject = new Map<
        string,
        { type: string; id: string; index: ReturnType<typeof extractSearchIndex> }[]
      >();
      for (const r of rows.rows) {
        const index = r.json ? await indexOf(deps, q, r) : { keys: [], strings: [], dates: [], numbers: [] };
        const list = byProject.get(r.project_id) ?? [];
        list.push({ type: r.resource_type, id: r.id, index });
        byProject.set(r.project_id, list);
      }
      for (const [projectId, entries] of byProject) {
        await writeIndexRows(q, projectId, entries, true);
        await q.query(
          `UPDATE resource r SET search_keys = k.keys, index_version = $2
             FROM (SELECT t, i, ARRAY(SELECT jsonb_array_elements_text(ks::jsonb)) AS keys
                     FROM unnest($3::text[], $4::text[], $5::text[]) AS u(t, i, ks)) k
            WHERE r.project_id = $1 AND r.resource_type = k.t AND r.id = k.i`,
          [
            projectId,
            INDEX_VERSION,
            entries.map((e) => e.type),
            entries.map((e) => e.id),
            entries.map((e) => JSON.stringify(e.index.keys)),
          ],
        );
      }
      return rows.rows.length;
    });
    reindexed += done;
    if (done < batch) break;
  }
  const left = await deps.db.query<{ n: string | number }>(
    'SELECT count(*) AS n FROM resource WHERE index_version < $1',
    [INDEX_VERSION],
  );
  await event('search.reindex_finished', reindexed);
  return { reindexed, remaining: Number(left.rows[0]?.n ?? 0), indexVersion: INDEX_VERSION };
}

/** The index of a stored row: plaintext rows from its clear part, blind keys from its sealed part. */
async function indexOf(
  deps: Parameters<typeof reindex>[0],
  q: Parameters<Parameters<SqlDriver['transaction']>[0]>[0],
  r: {
    project_id: string;
    resource_type: string;
    id: string;
    version_id: number;
    json: string | null;
    sealed: Record<string, string> | null;
  },
): Promise<ReturnType<typeof extractSearchIndex>> {
  const stored = {
    ...(JSON.parse(r.json!) as Record<string, unknown>),
    resourceType: r.resource_type,
    id: r.id,
  };
  const enc = deps.encryption;
  if (!enc || !r.sealed) return extractSearchIndex(stored, deps.baseUrl);
  for (const [cls, blob] of Object.entries(r.sealed)) {
    const ctx = {
      projectId: r.project_id,
      type: r.resource_type,
      id: r.id,
      version: Number(r.version_id),
      cls: cls as SensitivityClass,
    };
    restoreProtected(
      stored,
      JSON.parse((await enc.envelope.open(ctx, blob, q)).toString('utf8')) as ProtectedElement[],
    );
  }
  const split = splitProtected(stored, enc.policy);
  const index = extractSearchIndex(split.redacted, deps.baseUrl);
  const blindKey = await enc.envelope.blindKeyIn(r.project_id, q);
  if (split.projection && blindKey) {
    const keys = new Set(index.keys);
    for (const k of extractSearchIndex(split.projection, deps.baseUrl).keys)
      keys.add(k.endsWith('?') ? k : blindIndexKey(blindKey, enc.envelope.blindBits, k));
    index.keys = [...keys];
  }
  return index;
}
