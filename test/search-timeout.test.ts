import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { MAX_PREPARED_TEXTS, PgDriver } from '../src/store/pg/pg-driver.ts';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { ResourceStore } from '../src/store/resource-store.ts';
import { runSearch } from '../src/store/search-sql.ts';
import { parseSearch } from '../src/fhir/search-request.ts';
import { classifyDatabaseError } from '../src/store/sql-driver.ts';
import { isCustosError } from '../src/kernel/errors.ts';
import { needs, serverUrl } from './support/storage.ts';

// A search runs its statements outside any transaction, each bounded by statement_timeout set when
// the connections of a pool of their own open (no BEGIN / SET LOCAL / COMMIT per search): the bound
// must still hold, and must not leak onto the driver's other statements (writes, migrations).
describe('search statement time limit (PostgreSQL)', { skip: needs('postgres') }, () => {
  let driver: PgDriver;
  before(async () => {
    driver = await PgDriver.open(serverUrl!, { max: 2 });
  });
  after(async () => {
    await driver.close();
  });

  test('a search statement running longer than the limit is cancelled; other statements are not bounded', async () => {
    const store = new ResourceStore(driver);
    const q = store.searchQueries(200);
    assert.deepEqual((await q.query('SHOW statement_timeout')).rows, [{ statement_timeout: '200ms' }]);
    await assert.rejects(q.query('SELECT pg_sleep(3)'), (e: unknown) => {
      assert.equal(classifyDatabaseError(e), 'canceled');
      return true;
    });
    // The same pool keeps working after a cancellation.
    assert.deepEqual((await q.query<{ n: number }>('SELECT 1 AS n')).rows, [{ n: 1 }]);
    // The driver's own statements and transactions keep the server's default (no limit here).
    assert.deepEqual((await driver.query('SHOW statement_timeout')).rows, [{ statement_timeout: '0' }]);
    await driver.transaction(async (tx) => {
      assert.deepEqual((await tx.query('SHOW statement_timeout')).rows, [{ statement_timeout: '0' }]);
      await tx.query('SELECT pg_sleep(0.4)');
    });
  });

  test('a cancelled search statement is a 400 SEARCH_TOO_COSTLY, not a 500', async () => {
    const bounded = new ResourceStore(driver).searchQueries(100);
    // Every statement of this search is made to outlast the limit.
    const slow = {
      query: async <R>(sql: string, params: readonly unknown[] = []) => {
        await bounded.query('SELECT pg_sleep(2)');
        return bounded.query<R>(sql, params);
      },
    };
    const req = parseSearch(['Patient'], new URLSearchParams('name=zzyzx'), { strict: true });
    await assert.rejects(
      runSearch(slow, req, { projectId: 'p', canRead: () => true, baseUrl: 'http://localhost/fhir/R4' }),
      (e: unknown) => {
        assert.ok(isCustosError(e));
        assert.equal(e.code, 'SEARCH_TOO_COSTLY');
        return true;
      },
    );
  });
});

// Search statements repeat a few texts with new values: on a server each connection prepares a text
// once (no parse and analysis per search), but must plan every call for its own values. A generic
// plan, made once for any value, is the trap: a value that is rare must still use the index.
describe('prepared search statements (PostgreSQL)', { skip: needs('postgres') }, () => {
  let driver: PgDriver;
  let q: ReturnType<ResourceStore['searchQueries']>;
  before(async () => {
    // One connection, so that the session inspected is the one the statements ran on.
    driver = await PgDriver.open(serverUrl!, { max: 1 });
    q = new ResourceStore(driver).searchQueries(10_000);
    await q.query(`CREATE TEMP TABLE skew (v text NOT NULL)`);
    await q.query(
      `INSERT INTO skew SELECT CASE WHEN g = 1 THEN 'rare' ELSE 'common' END FROM generate_series(1, 20000) g`,
    );
    await q.query(`CREATE INDEX ON skew (v)`);
    await q.query(`ANALYZE skew`);
  });
  after(async () => {
    await driver.close();
  });

  const prepared = async (text: string) =>
    (
      await q.query<{ n: number; generic: number; custom: number }>(
        `SELECT count(*)::int AS n, coalesce(sum(generic_plans), 0)::int AS generic, coalesce(sum(custom_plans), 0)::int AS custom
           FROM pg_prepared_statements WHERE statement = $1`,
        [text],
      )
    ).rows[0]!;

  test('a repeated statement is prepared once and planned for each value, never generically', async () => {
    const text = `SELECT count(*)::int AS n FROM skew WHERE v = $1`;
    for (let i = 0; i < 12; i++)
      assert.deepEqual((await q.query(text, ['common'], { prepare: true })).rows, [{ n: 19_999 }]);
    assert.deepEqual((await q.query(text, ['rare'], { prepare: true })).rows, [{ n: 1 }]);
    // PostgreSQL's default would switch to a generic plan after five custom ones.
    assert.deepEqual(await prepared(text), { n: 1, generic: 0, custom: 13 });
    // Without `prepare` nothing is kept.
    const unprepared = `SELECT count(*)::int AS n FROM skew WHERE v <> $1`;
    await q.query(unprepared, ['rare']);
    assert.equal((await prepared(unprepared)).n, 0);
  });

  test('at most MAX_PREPARED_TEXTS texts are prepared; later ones still run, unprepared', async () => {
    const texts = Array.from({ length: MAX_PREPARED_TEXTS + 5 }, (_, i) => `SELECT $1::int + ${i} AS n`);
    for (const [i, t] of texts.entries())
      assert.deepEqual((await q.query(t, [1], { prepare: true })).rows, [{ n: 1 + i }]);
    const kept = await q.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement LIKE 'SELECT $1::int + %'`,
    );
    // The previous test's statement holds one of the names.
    assert.equal(kept.rows[0]!.n, MAX_PREPARED_TEXTS - 1);
    // A prepared text is still answered after the cap is reached.
    assert.deepEqual((await q.query(texts[0]!, [5], { prepare: true })).rows, [{ n: 5 }]);
  });
});

test('embedded PGlite: searches run on the driver itself (one connection, no transaction held)', async () => {
  const driver = await PgliteDriver.open(undefined);
  try {
    const store = new ResourceStore(driver);
    assert.equal(store.searchQueries(10_000), driver);
    assert.equal(store.searchQueries(undefined), driver);
  } finally {
    await driver.close();
  }
});
