import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
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
