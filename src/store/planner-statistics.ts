import { errorFields, type Logger } from '../log/logger.ts';
import type { SqlDriver } from './sql-driver.ts';

/**
 * Keeps the planner's statistics of Custos' own tables fresh where nothing else does.
 *
 * PostgreSQL plans from statistics that ANALYZE gathers, and normally autovacuum runs ANALYZE as
 * tables grow. Embedded PGlite never runs autovacuum, and a PostgreSQL server may have it turned
 * off (`autovacuum = off`). A table that was never analyzed has no statistics at all, and then
 * the planner may read one resource by id through `resource_last_updated` with a filter on id
 * instead of through the primary key: measured at 8,000 rows, 1.5 ms instead of 0.06 ms on a
 * server and 5.3 ms instead of 0.3 ms embedded, growing with the table (docs/bench.md, "The by-id
 * planner trap"). So Custos runs ANALYZE itself in those two cases, and only then.
 *
 * The rule mirrors autovacuum's analyze threshold (50 rows + 10% of the table), measured in pages
 * because PGlite keeps no row counters: a table is analyzed when it was never analyzed and holds
 * at least `minPages`, or when it has grown by more than `minPages` + 10% of the pages it had at
 * its last ANALYZE. ANALYZE reads a fixed sample (300 × default_statistics_target rows), so one
 * pass costs about the same at any table size.
 *
 * The other thing autovacuum does that searches depend on: it empties the pending lists of GIN
 * indexes (new entries queue there, and every scan reads the whole list). Each pass does that too,
 * with `gin_clean_pending_list`, which costs what merging those entries costs and nothing when the
 * list is empty. Migration 12 caps the lists at 256 kB between passes.
 *
 * What this does not do: VACUUM. Dead row versions left by updates and deletes are not reclaimed
 * without autovacuum (README, "Database maintenance").
 */
export interface PlannerStatisticsOptions {
  /** How often the tables' sizes are compared with their last ANALYZE. */
  intervalMs?: number;
  /** The threshold's fixed part, in 8 KiB pages (autovacuum's 50 rows are a few pages of resources). */
  minPages?: number;
  /** The threshold's proportional part (autovacuum's analyze_scale_factor). */
  scale?: number;
}

export interface TableSize {
  /** Schema-qualified, quoted: safe to put in a statement. */
  qualified: string;
  name: string;
  /** pg_class.reltuples: -1 if never analyzed or vacuumed. */
  reltuples: number;
  /** pg_class.relpages: the size in pages at the last ANALYZE or VACUUM. */
  relpages: number;
  /** The size in pages now. */
  pages: number;
}

/** Whether `t` is due for ANALYZE under the rule above. Exported for its tests. */
export function dueForAnalyze(t: TableSize, minPages: number, scale: number): boolean {
  if (t.pages < minPages) return false;
  if (t.reltuples < 0) return true;
  return t.pages > t.relpages + minPages + scale * t.relpages;
}

/**
 * Whether this database needs Custos to keep its statistics: always embedded; on a server, when
 * autovacuum (or the row counting it relies on) is off.
 */
export async function needsOwnStatistics(db: SqlDriver): Promise<boolean> {
  if (db.kind === 'embedded') return true;
  const r = await db.query<{ autovacuum: string; track_counts: string }>(
    `SELECT current_setting('autovacuum') AS autovacuum, current_setting('track_counts') AS track_counts`,
  );
  const s = r.rows[0];
  return !s || s.autovacuum !== 'on' || s.track_counts !== 'on';
}

/** The GIN indexes of the current schema's tables this role owns (schema-qualified, quoted). */
export async function ginIndexes(db: SqlDriver): Promise<string[]> {
  const r = await db.query<{ qualified: string }>(
    `SELECT quote_ident(n.nspname) || '.' || quote_ident(i.relname) AS qualified
       FROM pg_class i
       JOIN pg_am am ON am.oid = i.relam AND am.amname = 'gin'
       JOIN pg_namespace n ON n.oid = i.relnamespace
      WHERE n.nspname = current_schema() AND i.relkind = 'i' AND pg_has_role(i.relowner, 'USAGE')
      ORDER BY i.relname`,
  );
  return r.rows.map((x) => x.qualified);
}

/** The current schema's ordinary tables this role may ANALYZE, with their sizes. */
export async function tableSizes(db: SqlDriver): Promise<TableSize[]> {
  const r = await db.query<TableSize>(
    `SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS qualified, c.relname AS name,
            c.reltuples::float8 AS reltuples, c.relpages::int AS relpages,
            (pg_relation_size(c.oid) / current_setting('block_size')::int)::int AS pages
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = current_schema() AND c.relkind = 'r' AND pg_has_role(c.relowner, 'USAGE')
      ORDER BY c.relname`,
  );
  return r.rows;
}

/** How many passes apart a table with pages that ANALYZE found empty is looked at again. */
export const EMPTY_RECHECK_PASSES = 10;

/**
 * Whether `t`, which holds pages but whose last ANALYZE counted no rows, is due again at pass `pass`.
 * ANALYZE counts only committed rows: run while a bulk insert was still open, it records 0 rows at the
 * table's full size, and {@link dueForAnalyze}'s growth rule then never fires (the table does not grow
 * after the commit). Such a table is analyzed again, at most every EMPTY_RECHECK_PASSES passes after
 * the keeper last found it empty (`lastEmptyPass`; a table emptied by deletes keeps its pages until
 * VACUUM, so not at every pass). Exported for its tests.
 */
export function dueAsEmpty(t: TableSize, minPages: number, pass: number, lastEmptyPass?: number): boolean {
  if (t.reltuples !== 0 || t.pages < minPages) return false;
  return lastEmptyPass === undefined || pass - lastEmptyPass >= EMPTY_RECHECK_PASSES;
}

export class PlannerStatistics {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> | undefined;
  private stopped = false;
  /** Passes run so far, and the pass at which each table was last analyzed and found empty. */
  private passes = 0;
  private readonly foundEmpty = new Map<string, number>();
  private readonly minPages: number;
  private readonly scale: number;

  private constructor(
    private readonly db: SqlDriver,
    private readonly database: 'resources' | 'audit',
    private readonly log: Logger,
    private readonly intervalMs: number,
    opts: PlannerStatisticsOptions,
  ) {
    this.minPages = opts.minPages ?? 4;
    this.scale = opts.scale ?? 0.1;
  }

  /**
   * Starts keeping `db`'s statistics if it needs it (see `needsOwnStatistics`): one pass now, then
   * one every interval. On a server with autovacuum off, also warns that dead rows are not vacuumed.
   */
  static async start(
    db: SqlDriver,
    database: 'resources' | 'audit',
    log: Logger,
    opts: PlannerStatisticsOptions = {},
  ): Promise<PlannerStatistics | undefined> {
    if (!(await needsOwnStatistics(db))) return undefined;
    if (db.kind === 'postgres') log.warn('store.autovacuum_off', { code: database });
    const keeper = new PlannerStatistics(db, database, log, opts.intervalMs ?? 30_000, opts);
    keeper.tick();
    keeper.timer = setInterval(() => keeper.tick(), keeper.intervalMs);
    keeper.timer.unref();
    return keeper;
  }

  private tick(): void {
    if (this.running || this.stopped) return;
    this.running = this.pass()
      .catch((e: unknown) =>
        this.log.error('store.analyze_failed', { code: this.database, ...errorFields(e) }),
      )
      .finally(() => (this.running = undefined));
  }

  /**
   * One pass: empty the GIN pending lists, then ANALYZE every table that is due. Returns the names
   * of the tables analyzed.
   */
  async pass(): Promise<string[]> {
    for (const index of await ginIndexes(this.db)) {
      if (this.stopped) return [];
      const r = await this.db.query<{ pages: number }>(
        `SELECT gin_clean_pending_list($1::regclass)::int AS pages`,
        [index],
      );
      const pages = r.rows[0]?.pages ?? 0;
      if (pages > 0)
        this.log.debug('store.gin_pending_merged', { code: index.replace(/^.*\./, ''), count: pages });
    }
    const analyzed: string[] = [];
    const pass = ++this.passes;
    for (const t of await tableSizes(this.db)) {
      if (this.stopped) break;
      const recheck = dueAsEmpty(t, this.minPages, pass, this.foundEmpty.get(t.name));
      if (!recheck && !dueForAnalyze(t, this.minPages, this.scale)) continue;
      const started = performance.now();
      await this.db.query(`ANALYZE ${t.qualified}`);
      if (recheck) this.foundEmpty.set(t.name, pass);
      analyzed.push(t.name);
      this.log.info('store.analyzed', {
        code: t.name,
        count: t.pages,
        durationMs: Math.round(performance.now() - started),
      });
    }
    return analyzed;
  }

  /** Stops the timer and waits for a pass in progress (call before closing the database). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    await this.running;
  }
}
