import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';
import { silentLogger } from '../src/log/logger.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import {
  dueAsEmpty,
  dueForAnalyze,
  EMPTY_RECHECK_PASSES,
  needsOwnStatistics,
  PlannerStatistics,
  tableSizes,
  type TableSize,
} from '../src/store/planner-statistics.ts';
import { CHANGES_SQL, SubscriptionQueue } from '../src/subscriptions/subscription-queue.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import { HTEST, startHarness } from './support/harness.ts';
import { until } from './support/until.ts';
import { createTestStorage, needs } from './support/storage.ts';

// Queries whose plan must stay right as data grows: a wrong plan here is not slower by a constant,
// it reads the whole history on every call.
//
// Where no autovacuum runs (embedded PGlite always, a server configured with autovacuum = off),
// tables are never analyzed, and the planner then reads a resource by id through
// resource_last_updated with a filter on id: a scan of every resource of that type. Custos analyzes
// its own tables there (src/store/planner-statistics.ts); these tests hold it to that.

const BY_ID = 'EXPLAIN SELECT * FROM resource WHERE project_id = $1 AND resource_type = $2 AND id = $3';

async function byIdPlan(db: SqlDriver): Promise<string> {
  const r = await db.query<{ 'QUERY PLAN': string }>(BY_ID, ['p-stats', 'Patient', 'stats-77']);
  return r.rows.map((x) => x['QUERY PLAN']).join('\n');
}

/** `n` synthetic Patient rows written straight into the table (the gateway is not what is tested here). */
async function insertPatients(db: SqlDriver, from: number, n: number): Promise<void> {
  await db.query(
    `INSERT INTO resource (project_id, resource_type, id, version_id, last_updated, deleted, content)
     SELECT 'p-stats', 'Patient', 'stats-' || g, 1, now() - g * interval '1 second', false,
            jsonb_build_object('resourceType', 'Patient', 'id', 'stats-' || g,
                               'name', jsonb_build_array(jsonb_build_object('family', 'Teststats' || g)))
       FROM generate_series($1::int, $2::int) g`,
    [from, from + n - 1],
  );
}

async function resourceSize(db: SqlDriver): Promise<TableSize> {
  const t = (await tableSizes(db)).find((x) => x.name === 'resource');
  assert.ok(t, 'the resource table is listed');
  return t;
}

describe('planner statistics: the rule', () => {
  const t = (reltuples: number, relpages: number, pages: number): TableSize => ({
    qualified: 'public.t',
    name: 't',
    reltuples,
    relpages,
    pages,
  });
  test('a table never analyzed is due once it holds a few pages, not before', () => {
    assert.equal(dueForAnalyze(t(-1, 0, 3), 4, 0.1), false);
    assert.equal(dueForAnalyze(t(-1, 0, 4), 4, 0.1), true);
  });
  test('an analyzed table is due when it grew by more than the fixed part plus 10%', () => {
    assert.equal(dueForAnalyze(t(8000, 200, 224), 4, 0.1), false);
    assert.equal(dueForAnalyze(t(8000, 200, 225), 4, 0.1), true);
    assert.equal(dueForAnalyze(t(8000, 200, 150), 4, 0.1), false, 'shrinking is not growth');
  });
  test('a table analyzed empty while it holds pages is due again, not at every pass', () => {
    // ANALYZE during an open bulk insert: 0 rows at the full 20 pages; the growth rule stays silent.
    assert.equal(dueForAnalyze(t(0, 20, 20), 2, 0.1), false);
    assert.equal(dueAsEmpty(t(0, 20, 20), 2, 1), true, 'never found empty by this keeper');
    assert.equal(dueAsEmpty(t(0, 20, 20), 2, 5, 1), false);
    assert.equal(dueAsEmpty(t(0, 20, 20), 2, 1 + EMPTY_RECHECK_PASSES, 1), true);
    assert.equal(dueAsEmpty(t(0, 1, 1), 2, 1), false, 'below the fixed part');
    assert.equal(dueAsEmpty(t(-1, 0, 20), 2, 1), false, 'never analyzed: the growth rule decides');
    assert.equal(dueAsEmpty(t(120, 20, 20), 2, 1), false, 'rows counted');
  });
  test('a server with autovacuum on is left to autovacuum; off, or embedded, Custos analyzes', async () => {
    const server = (autovacuum: string, trackCounts = 'on'): SqlDriver =>
      ({
        kind: 'postgres',
        // Stands in for the one settings query; the real server case is below.
        query: async () => ({ rows: [{ autovacuum, track_counts: trackCounts }] }),
      }) as unknown as SqlDriver;
    assert.equal(await needsOwnStatistics(server('on')), false);
    assert.equal(await needsOwnStatistics(server('off')), true);
    assert.equal(await needsOwnStatistics(server('on', 'off')), true, 'autovacuum needs track_counts');
    assert.equal(await needsOwnStatistics({ kind: 'embedded' } as SqlDriver), true);
  });
});

describe('planner statistics: embedded', () => {
  test('a by-id read uses the primary key once the keeper has analyzed a grown table', async () => {
    const db = await PgliteDriver.open(undefined);
    try {
      await migrate(db, RESOURCE_MIGRATIONS, 'custos_migration', silentLogger);
      await db.query(`INSERT INTO project (id, name, kind) VALUES ('p-stats', 'Stats', 'sandbox')`);
      await insertPatients(db, 1, 8000);
      assert.equal((await resourceSize(db)).reltuples, -1, 'nothing analyzed the table');
      // The trap this keeper exists for (if a PGlite upgrade makes this fail, the planner no longer
      // falls into it without statistics: keep the assertions below, drop this one).
      assert.doesNotMatch(await byIdPlan(db), /resource_pkey/);

      const keeper = await PlannerStatistics.start(db, 'resources', silentLogger, { intervalMs: 3_600_000 });
      assert.ok(keeper, 'embedded storage always gets a keeper');
      try {
        await until('the first pass to analyze the resource table', async () =>
          (await resourceSize(db)).reltuples >= 0 ? true : undefined,
        );
        assert.match(await byIdPlan(db), /Index Scan using resource_pkey/);
        const analyzed = await resourceSize(db);
        assert.equal(analyzed.reltuples, 8000);
        assert.deepEqual(await keeper.pass(), [], 'no growth, no second ANALYZE');

        await insertPatients(db, 8001, 400); // 5%: under the threshold
        assert.deepEqual(await keeper.pass(), []);
        await insertPatients(db, 8401, 1200); // 20% in all: over it
        assert.deepEqual(await keeper.pass(), ['resource']);
        assert.equal((await resourceSize(db)).reltuples, 9600);
      } finally {
        await keeper.stop();
      }
    } finally {
      await db.close();
    }
  });
});

describe('GIN pending lists (searches read them whole)', () => {
  /** The planner's cost of the GIN scan of a search on one key: it counts the pending pages. */
  async function ginScanCost(db: SqlDriver): Promise<number> {
    const r = await db.query<{ 'QUERY PLAN': string }>(
      `EXPLAIN SELECT id FROM resource WHERE search_keys && ARRAY['k35=' || md5('77' || '35')]`,
    );
    const line = r.rows
      .map((x) => x['QUERY PLAN'])
      .find((l) => l.includes('Bitmap Index Scan on resource_search_keys'));
    assert.ok(line, 'the search uses the GIN index');
    return Number(/cost=[\d.]+\.\.([\d.]+)/.exec(line)![1]);
  }

  test('capped at 256 kB by migration 12, and emptied by the keeper where no autovacuum runs', async () => {
    const db = await PgliteDriver.open(undefined);
    try {
      await migrate(db, RESOURCE_MIGRATIONS, 'custos_migration', silentLogger);
      const opts = await db.query<{ relname: string; reloptions: string[] }>(
        `SELECT relname, reloptions FROM pg_class WHERE relname IN ('resource_search_keys', 'resource_patients', 'resource_identifier') ORDER BY relname`,
      );
      assert.deepEqual(
        opts.rows.map((r) => [r.relname, r.reloptions]),
        ['resource_identifier', 'resource_patients', 'resource_search_keys'].map((n) => [
          n,
          ['gin_pending_list_limit=256'],
        ]),
      );
      await db.query(`INSERT INTO project (id, name, kind) VALUES ('p-stats', 'Stats', 'sandbox')`);
      await db.query(
        `INSERT INTO resource (project_id, resource_type, id, version_id, last_updated, deleted, content, search_keys)
         SELECT 'p-stats', 'Patient', 'gin-' || g, 1, now(), false, '{}'::jsonb,
                ARRAY(SELECT 'k' || j || '=' || CASE WHEN j < 30 THEN 'common' || j ELSE md5(g::text || j) END
                        FROM generate_series(1, 40) j)
           FROM generate_series(1, 3000) g`,
      );
      await db.query('ANALYZE resource'); // statistics alike before and after: only the list differs
      const before = await ginScanCost(db);
      const keeper = await PlannerStatistics.start(db, 'resources', silentLogger, { intervalMs: 3_600_000 });
      try {
        await keeper!.pass();
      } finally {
        await keeper!.stop();
      }
      const after = await ginScanCost(db);
      assert.ok(after * 3 < before, `the GIN scan costs ${after} after the pass, ${before} before`);
      const left = await db.query<{ n: number }>(
        `SELECT gin_clean_pending_list('resource_search_keys'::regclass)::int AS n`,
      );
      assert.equal(left.rows[0]!.n, 0, 'nothing left pending');
    } finally {
      await db.close();
    }
  });
});

describe('planner statistics: a running server', () => {
  test('the server analyzes what it writes, and logs table names and sizes only', async () => {
    const h = await startHarness({ plannerStatistics: { intervalMs: 100, minPages: 2 } });
    try {
      const db = h.server.core.resourceDb;
      const expected = await needsOwnStatistics(db);
      assert.equal(h.server.statistics[0] !== undefined, expected, 'a keeper exactly where one is needed');
      if (!expected) return; // a server whose autovacuum is on: nothing of ours to check
      const entry = Array.from({ length: 60 }, (_, i) => ({
        resource: {
          resourceType: 'Patient',
          meta: { security: [HTEST] },
          name: [{ family: `Teststatsfamily${i}`, given: ['Zzyzx'] }],
          birthDate: '1970-01-01',
        },
        request: { method: 'POST', url: 'Patient' },
      }));
      const res = await h.fhir('/', {
        method: 'POST',
        body: JSON.stringify({ resourceType: 'Bundle', type: 'transaction', entry }),
      });
      assert.equal(res.status, 200);
      await until('the keeper to analyze the resource table', async () =>
        (await resourceSize(db)).reltuples > 0 ? true : undefined,
      );
      const lines = await until('the analyze log line', () =>
        h.logLines.find((l) => l.includes('"store.analyzed"') && l.includes('"code":"resource"')),
      );
      assert.doesNotMatch(h.logLines.filter((l) => l.includes('store.')).join('\n'), /Teststatsfamily/);
      assert.match(lines, /"count":\d+/);
    } finally {
      await h.close();
    }
  });
});

describe('the subscription change feed reads only what follows its cursor', () => {
  /** Writes `n` versions (one transaction), analyzes, and moves the cursor past all but the last 3. */
  async function feedOf(db: SqlDriver, n: number): Promise<void> {
    await migrate(db, RESOURCE_MIGRATIONS, 'custos_migration', silentLogger);
    await db.query(
      `INSERT INTO resource_version (project_id, resource_type, id, version_id, last_updated, deleted, method)
       SELECT 'p-feed', 'Observation', 'feed-' || g, 1, now(), false, 'create' FROM generate_series(1, $1::int) g`,
      [n],
    );
    await db.query('ANALYZE resource_version');
    await db.query(
      `UPDATE subscription_cursor SET (change_xid, change_seq) =
         (SELECT change_xid, change_seq FROM resource_version ORDER BY change_xid, change_seq OFFSET $1 LIMIT 1)
       WHERE name = 'rest-hook'`,
      [n - 4],
    );
  }

  async function check(db: SqlDriver): Promise<void> {
    await feedOf(db, 5000);
    const changes = await new SubscriptionQueue(db).changes(100);
    assert.deepEqual(
      changes.map((c) => c.id),
      ['feed-4998', 'feed-4999', 'feed-5000'],
      'the three versions after the cursor, in order',
    );
    const plan = (
      await db.query<{ 'QUERY PLAN': string }>(`EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) ${CHANGES_SQL}`, [
        'rest-hook',
        100,
      ])
    ).rows
      .map((r) => r['QUERY PLAN'])
      .join('\n');
    // The cursor bounds the index scan; a filter or a join filter would read all 5,000 versions.
    assert.match(plan, /Index Cond: \(\(ROW\(change_xid, change_seq\) > ROW\(/);
    assert.doesNotMatch(plan, /Rows Removed/);
    assert.match(
      plan,
      /Index Scan using resource_version_change on resource_version v \(actual rows=3(\.00)? /,
    );
  }

  test('embedded', async () => {
    const db = await PgliteDriver.open(undefined);
    try {
      await check(db);
    } finally {
      await db.close();
    }
  });

  test('PostgreSQL server', { skip: needs('postgres') }, async () => {
    const storage = await createTestStorage({ forceServer: true });
    const db = await PgDriver.open(storage.databaseUrl!);
    try {
      await check(db);
    } finally {
      await db.close();
      await storage.cleanup();
    }
  });
});
