import { CustosError, type IssueDetail } from '../kernel/errors.ts';
import type { SqlQueryable } from './sql-driver.ts';
import { classifyDatabaseError } from './sql-driver.ts';
import { indexKey, normalizeReference, presenceKey } from '../fhir/search-index.ts';
import type { SearchParam } from '../fhir/search-parameters.ts';
import {
  SEARCH_LIMITS,
  type ColumnParam,
  type Filter,
  type SearchRequest,
  type SortKey,
} from '../fhir/search-request.ts';
import {
  dateRange,
  datePredicate,
  escapeLike,
  normalizeString,
  numberPredicate,
  numberRange,
  parseQuantity,
  renumber,
  splitPrefix,
  SearchValueError,
} from '../fhir/search-values.ts';

/**
 * Compiles a parsed search into one SQL query over the resource table and its index (migration 3),
 * with the caller's access (project, searchable types, compartment) as predicates of the same
 * query, so `_count`, `_total` and paging count only what the caller may see.
 */

/** What the caller may see; the gateway builds it from the principal. */
export interface SearchAccess {
  projectId: string;
  /** Types the caller may search or read; anything else is never returned nor used in chains. */
  canRead: (type: string) => boolean;
  /** Compartment search: only resources in this patient's compartment. */
  patient?: string;
  /** The server's FHIR base URL: absolute references to it match relative ones. */
  baseUrl: string;
  now?: Date;
  /**
   * Field-level encryption: the sensitivity class of a parameter that may hold protected values
   * (exact criteria on it also match blind-index keys), and the blind form of an index key.
   */
  protection?: {
    classOf: (type: string, code: string) => string | undefined;
    blind: (key: string) => string;
  };
  /**
   * Access policy and scope filters (src/phi/access-policy.ts): the predicate rows of `type` must
   * satisfy to be returned as matches (`match`) or to be read through includes, chains and `_has`
   * (`read`). Compiled into the same statements, so `_count`, `_total` and cursors stay right.
   * Absent: no restriction beyond `canRead`.
   */
  predicate?: (type: string, use: 'match' | 'read') => AccessPredicate;
}

/**
 * A row predicate over what the store keeps of every version: its patient-compartment membership
 * (`patients`, computed at write time) and its exact-match index keys (`search_keys`). The gateway
 * evaluates the same predicate in memory on a single version (read, history, writes).
 */
export type AccessPredicate =
  | { op: 'true' }
  | { op: 'false' }
  /** In the compartment of at least one of these patients. */
  | { op: 'patients'; ids: readonly string[] }
  /** Holds at least one of these index keys. */
  | { op: 'keys'; keys: readonly string[] }
  | { op: 'and' | 'or'; of: readonly AccessPredicate[] }
  | { op: 'not'; of: AccessPredicate };

/** The SQL of `pred` on the row alias `r` (`add` binds a parameter and returns its placeholder). */
export function predicateSql(pred: AccessPredicate, r: string, add: (v: unknown) => string): string {
  switch (pred.op) {
    case 'true':
      return 'true';
    case 'false':
      return 'false';
    case 'patients':
      return pred.ids.length === 0 ? 'false' : `${r}.patients && ${add([...pred.ids])}::text[]`;
    case 'keys':
      return pred.keys.length === 0 ? 'false' : `${r}.search_keys && ${add([...pred.keys])}::text[]`;
    case 'and':
    case 'or':
      return `(${pred.of.map((x) => predicateSql(x, r, add)).join(pred.op === 'and' ? ' AND ' : ' OR ')})`;
    case 'not':
      return `NOT ${predicateSql(pred.of, r, add)}`;
  }
}

/**
 * The index keys an exact criterion matches (token, reference or uri, without modifier or with
 * `:not`), for access-policy and SMART scope criteria: those compile to key probes only, so that
 * SQL and the in-memory evaluation of the same predicate agree. Anything else is refused
 * (SEARCH_INVALID).
 */
export function criterionKeys(f: Filter, baseUrl: string): { keys: string[]; negate: boolean } {
  if (f.kind !== 'param') invalid('Access criteria cannot chain or use _has.');
  const { param, modifier, values } = f;
  if (modifier !== undefined && modifier !== 'not')
    invalid(`Access criteria: parameter '${param.code}' with a modifier other than :not is not supported.`);
  const sp = param as SearchParam;
  if (
    param.code === '_id' ||
    param.code === '_lastUpdated' ||
    !['token', 'reference', 'uri'].includes(sp.type)
  )
    invalid(`Access criteria: parameter '${param.code}' is not a token, reference or uri parameter.`);
  const keys =
    sp.type === 'token'
      ? values.map((v) => indexKey(param.code, tokenKeySuffix(v)))
      : sp.type === 'uri'
        ? values.map((v) => indexKey(param.code, UNESCAPE(v)))
        : values.flatMap((v) => referenceKeysOf(sp, undefined, v, baseUrl));
  return { keys, negate: modifier === 'not' };
}

/** A criterion matched partly through blind indexes: the gateway re-checks it on decrypted rows. */
export interface BlindCheck {
  resourceType: string;
  cls: string;
  /** Plain index keys, any of which must be present in the decrypted resource's index. */
  keys: string[];
  negate: boolean;
}

export interface SearchRow {
  resourceType: string;
  id: string;
  versionId: number;
  lastUpdated: string;
  json: string;
  patients: string[];
  keys: string[];
  sealed?: Record<string, string>;
}

export interface SearchPage {
  matches: SearchRow[];
  includes: SearchRow[];
  total?: number;
  next?: string;
  previous?: string;
  warnings: IssueDetail[];
  /** Criteria the gateway must re-check after decryption (blind-index matches can be false positives). */
  blindChecks: BlindCheck[];
}

interface Cursor {
  /** 'n': rows after the position; 'p': rows before it. */
  d: 'n' | 'p';
  /** Sort values of the row at the position (text, as SQL printed them), then type and id. */
  v: (string | null)[];
  t: string;
  i: string;
}

class Params {
  readonly values: unknown[] = [];
  add(v: unknown): string {
    return `$${this.values.push(v)}`;
  }
}

function invalid(diagnostics: string): never {
  throw new CustosError('SEARCH_INVALID', [{ severity: 'error', code: 'invalid', diagnostics }]);
}
function tooCostly(diagnostics: string): never {
  throw new CustosError('SEARCH_TOO_COSTLY', [{ severity: 'error', code: 'too-costly', diagnostics }]);
}

/** Splits at the first unescaped `sep` and removes the escapes. */
function splitEscaped(value: string, sep: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < value.length; i++) {
    const ch = value[i]!;
    if (ch === '\\' && i + 1 < value.length) cur += value[++i];
    else if (ch === sep) {
      out.push(cur);
      cur = '';
    } else cur += ch;
  }
  out.push(cur);
  return out;
}

/** A token search value as an index key suffix: `system|code`, `|code`, `system|*`, `*|code`. */
function tokenKeySuffix(value: string): string {
  const parts = splitEscaped(value, '|');
  if (parts.length === 1) return `*|${parts[0]}`;
  if (parts.length !== 2) invalid('A token value has more than one unescaped |.');
  const [system, code] = parts as [string, string];
  if (code === '') return `${system}|*`;
  return `${system}|${code}`;
}

const UNESCAPE = (v: string) => splitEscaped(v, '\u0000')[0]!;

/** Wraps a value parser so its message names the parameter but not the value (it could be PHI). */
function parsed<T>(param: string, what: string, f: () => T): T {
  try {
    return f();
  } catch (e) {
    if (e instanceof SearchValueError) invalid(`Parameter '${param}': the value is not a valid ${what}.`);
    throw e;
  }
}

function referenceKeysOf(
  sp: SearchParam,
  modifier: string | undefined,
  raw: string,
  baseUrl: string,
): string[] {
  const v = UNESCAPE(raw);
  if (modifier === 'identifier') return [indexKey(`${sp.code}:identifier`, tokenKeySuffix(raw))];
  if (modifier?.startsWith('type:')) {
    const type = modifier.slice(5);
    const id = v.includes('/') ? normalizeReference(v, baseUrl) : `${type}/${v}`;
    if (!id.startsWith(`${type}/`))
      invalid(`Parameter '${sp.code}:${type}': the reference is not to a ${type}.`);
    return [indexKey(sp.code, id)];
  }
  if (/^[a-z][a-z0-9+.-]*:/i.test(v)) return [indexKey(sp.code, normalizeReference(v, baseUrl))];
  if (v.includes('/')) return [indexKey(sp.code, normalizeReference(v, baseUrl))];
  // A bare id: any of the parameter's target types.
  const targets = sp.targets.length > 0 ? sp.targets : [];
  return targets.length > 0 ? targets.map((t) => indexKey(sp.code, `${t}/${v}`)) : [indexKey(sp.code, v)];
}

class Compiler {
  readonly p = new Params();
  readonly blindChecks: BlindCheck[] = [];
  constructor(
    private readonly q: SqlQueryable,
    private readonly access: SearchAccess,
  ) {}

  /** SQL conditions (ANDed) for `filters` on the row alias `r`. */
  async where(filters: readonly Filter[], r: string): Promise<string[]> {
    const w = await this.whereParts(filters, r);
    return [...w.gin, ...w.rest];
  }

  /**
   * SQL conditions for `filters` on the row alias `r`, split into the positive index-key probes
   * (`gin`: answered by the GIN index on search_keys alone) and the rest; `pinpoint` when a probe
   * names one patient, encounter or identifier (see `pinpointKeys`).
   */
  async whereParts(filters: readonly Filter[], r: string): Promise<WhereParts> {
    const ctx: WhereCtx = { mustKeys: [], gin: [], pinpoint: false };
    const rest: string[] = [];
    for (const f of filters) {
      const c = await this.filter(f, r, ctx);
      if (c) rest.push(c);
    }
    if (ctx.mustKeys.length > 0) ctx.gin.unshift(`${r}.search_keys @> ${this.p.add(ctx.mustKeys)}::text[]`);
    return { gin: ctx.gin, rest, pinpoint: ctx.pinpoint };
  }

  private keysAny(r: string, keys: string[]): string {
    return keys.length === 0 ? 'false' : `${r}.search_keys && ${this.p.add(keys)}::text[]`;
  }

  /** Positive exact keys: one goes to the shared `@>` probe, several to an `&&` probe of their own. */
  private probe(r: string, keys: string[], ctx: WhereCtx, pinpoint: boolean): undefined {
    if (pinpoint && keys.length > 0) ctx.pinpoint = true;
    if (keys.length === 1) ctx.mustKeys.push(keys[0]!);
    else ctx.gin.push(this.keysAny(r, keys));
    return undefined;
  }

  /** One filter; single exact keys go to `ctx.mustKeys` so several criteria share one GIN probe. */
  private async filter(f: Filter, r: string, ctx: WhereCtx): Promise<string | undefined> {
    if (f.kind === 'chain') {
      const keys = await this.chainKeys(f);
      return this.probe(r, keys, ctx, pinpointKeys(f.param, undefined, keys));
    }
    if (f.kind === 'has') return this.has(f, r);
    const { param, modifier, values } = f;
    const code = param.code;
    if (modifier === 'missing') {
      const present = `${r}.search_keys @> ${this.p.add([presenceKey(code)])}::text[]`;
      return values[0] === 'true' ? `NOT (${present})` : present;
    }
    if (code === '_id') return `${r}.id = ANY(${this.p.add(values.map(UNESCAPE))}::text[])`;
    if (code === '_lastUpdated') {
      return this.ors(
        values.map((v) => {
          const { prefix, value } = parsed(code, 'date', () => splitPrefix(v));
          const range = parsed(code, 'date', () => dateRange(value));
          return this.rangeSql(
            datePredicate(prefix, range, this.access.now),
            `${r}.last_updated`,
            `(${r}.last_updated + interval '1 millisecond')`,
          );
        }),
      );
    }
    const sp = param as SearchParam;
    const cls = this.access.protection?.classOf(f.resourceType, code);
    if (cls && (sp.type === 'token' || sp.type === 'reference' || sp.type === 'composite')) {
      if (modifier === 'text')
        throw new CustosError('SEARCH_PROTECTED', [
          {
            severity: 'error',
            code: 'not-supported',
            diagnostics: `Parameter '${code}:${modifier}' would need the plaintext of protected elements.`,
          },
        ]);
      const plain =
        sp.type === 'token' && modifier === 'of-type'
          ? values.map((v) => {
              const parts = splitEscaped(v, '|');
              if (parts.length !== 3) invalid(`Parameter '${code}:of-type' needs system|code|value.`);
              return indexKey(`${code}:of-type`, parts.join('|'));
            })
          : sp.type === 'token'
            ? values.map((v) => indexKey(code, tokenKeySuffix(v)))
            : sp.type === 'reference'
              ? values.flatMap((v) => this.referenceKeys(sp, modifier, v))
              : values.map((v) => {
                  const parts = splitEscaped(v, '$');
                  if (parts.length !== 2 || sp.components![1]!.param.type !== 'token')
                    throw new CustosError('SEARCH_PROTECTED');
                  return indexKey(code, `${tokenKeySuffix(parts[0]!)}$${tokenKeySuffix(parts[1]!)}`);
                });
      const keys = [...plain, ...plain.map((k) => this.access.protection!.blind(k))];
      const negate = modifier === 'not';
      if (r === 'r') this.blindChecks.push({ resourceType: f.resourceType, cls, keys: plain, negate });
      if (negate) return `NOT (${this.keysAny(r, keys)})`;
      ctx.gin.push(this.keysAny(r, keys));
      if (pinpointKeys(sp, modifier, plain)) ctx.pinpoint = true;
      return undefined;
    }
    switch (sp.type) {
      case 'token': {
        if (modifier === 'text') return this.stringExists(r, `${code}:text`, values, 'prefix');
        const keys =
          modifier === 'of-type'
            ? values.map((v) => {
                const parts = splitEscaped(v, '|');
                if (parts.length !== 3) invalid(`Parameter '${code}:of-type' needs system|code|value.`);
                return indexKey(`${code}:of-type`, parts.join('|'));
              })
            : values.map((v) => indexKey(code, tokenKeySuffix(v)));
        if (modifier === 'not') return `NOT (${this.keysAny(r, keys)})`;
        return this.probe(r, keys, ctx, pinpointKeys(sp, modifier, keys));
      }
      case 'reference': {
        const keys = values.flatMap((v) => this.referenceKeys(sp, modifier, v));
        return this.probe(r, keys, ctx, pinpointKeys(sp, modifier, keys));
      }
      case 'uri': {
        if (modifier === 'below') return this.stringExists(r, code, values.map(UNESCAPE), 'raw-prefix');
        const keys =
          modifier === 'above'
            ? values.flatMap((v) => uriPrefixes(UNESCAPE(v)).map((u) => indexKey(code, u)))
            : values.map((v) => indexKey(code, UNESCAPE(v)));
        return this.keysAny(r, keys);
      }
      case 'string':
        return this.stringExists(
          r,
          code,
          values.map(UNESCAPE),
          modifier === 'exact' ? 'exact' : modifier === 'contains' ? 'contains' : 'prefix',
        );
      case 'date':
        return this.dateExists(r, code, values, undefined);
      case 'number':
      case 'quantity':
        return this.numberExists(r, sp, values, undefined);
      case 'composite':
        return this.composite(r, sp, values, ctx.mustKeys);
    }
  }

  private ors(parts: string[]): string {
    return parts.length === 1 ? parts[0]! : `(${parts.map((x) => `(${x})`).join(' OR ')})`;
  }

  /** Rewrites a predicate over `lo`/`hi`/`num` (from search-values.ts) onto real columns and our params. */
  private rangeSql(pred: { sql: string; params: unknown[] }, lo: string, hi: string): string {
    const offset = this.p.values.length;
    for (const v of pred.params) this.p.add(v);
    return renumber(pred.sql, offset)
      .replace(/\blo\b/g, lo)
      .replace(/\bhi\b/g, hi)
      .replace(/\bnum\b/g, lo);
  }

  private referenceKeys(sp: SearchParam, modifier: string | undefined, raw: string): string[] {
    return referenceKeysOf(sp, modifier, raw, this.access.baseUrl);
  }

  private stringExists(
    r: string,
    code: string,
    values: string[],
    mode: 'prefix' | 'exact' | 'contains' | 'raw-prefix',
  ): string {
    const conds = values.map((v) => {
      if (mode === 'exact') return `s.exact = ${this.p.add(v)}`;
      if (mode === 'raw-prefix') return `s.norm LIKE ${this.p.add(`${escapeLike(v)}%`)}`;
      const norm = normalizeString(v);
      if (norm === '') invalid(`Parameter '${code}' has an empty value.`);
      return mode === 'contains'
        ? `s.norm LIKE ${this.p.add(`%${escapeLike(norm)}%`)}`
        : `s.norm LIKE ${this.p.add(`${escapeLike(norm)}%`)}`;
    });
    return `EXISTS (SELECT 1 FROM search_string s WHERE s.project_id = ${r}.project_id AND s.resource_type = ${r}.resource_type
      AND s.id = ${r}.id AND s.code = ${this.p.add(code)} AND ${this.ors(conds)})`;
  }

  private dateExists(r: string, code: string, values: string[], comp: string[] | undefined): string {
    const conds = values.map((v) => {
      const { prefix, value } = parsed(code, 'date', () => splitPrefix(v));
      const range = parsed(code, 'date', () => dateRange(value));
      // `eq` (the value's range within the search range): stored ranges have lo < hi
      // (search-index.ts), so lo is also below the search range's end, and search_date_lo reads just
      // that slice. hi is compared as an expression so that the planner does not pick search_date_hi
      // instead (same estimate, but it reads every earlier value: 1 in 2 birth dates for `eq`).
      const eq = prefix === 'eq';
      const sql = this.rangeSql(
        datePredicate(prefix, range, this.access.now),
        'd.lo',
        eq ? "(d.hi + interval '0 s')" : 'd.hi',
      );
      return eq ? `(${sql} AND d.lo < ${this.p.add(range.hi)}::timestamptz)` : sql;
    });
    return `EXISTS (SELECT 1 FROM search_date d WHERE d.project_id = ${r}.project_id AND d.resource_type = ${r}.resource_type
      AND d.id = ${r}.id AND d.code = ${this.p.add(code)}${comp ? ` AND d.comp = ANY(${this.p.add(comp)}::text[])` : ''} AND ${this.ors(conds)})`;
  }

  private numberExists(
    r: string,
    sp: SearchParam,
    values: string[],
    comp: string[] | undefined,
    code = sp.code,
  ): string {
    const conds = values.map((v) => {
      if (sp.type === 'number') {
        const { prefix, value } = parsed(code, 'number', () => splitPrefix(v));
        return this.rangeSql(
          numberPredicate(
            prefix,
            parsed(code, 'number', () => numberRange(value)),
          ),
          'n.num',
          'n.num',
        );
      }
      const qty = parsed(code, 'quantity', () => parseQuantity(v));
      const parts = [this.rangeSql(numberPredicate(qty.prefix, qty.number), 'n.num', 'n.num')];
      if (qty.system) parts.push(`n.system = ${this.p.add(qty.system)}`);
      if (qty.code) {
        const c = this.p.add(qty.code);
        parts.push(qty.system ? `n.qcode = ${c}` : `(n.qcode = ${c} OR n.unit = ${c})`);
      }
      return parts.join(' AND ');
    });
    return `EXISTS (SELECT 1 FROM search_number n WHERE n.project_id = ${r}.project_id AND n.resource_type = ${r}.resource_type
      AND n.id = ${r}.id AND n.code = ${this.p.add(code)}${comp ? ` AND n.comp = ANY(${this.p.add(comp)}::text[])` : ''} AND ${this.ors(conds)})`;
  }

  /** Composite `token$value`: the token part selects the `comp` column (or key) of the second. */
  private composite(r: string, sp: SearchParam, values: string[], mustKeys: string[]): string | undefined {
    const [, second] = sp.components!;
    const conds: string[] = [];
    const keys: string[] = [];
    for (const v of values) {
      const parts = splitEscaped(v, '$');
      if (parts.length !== 2) invalid(`Parameter '${sp.code}' needs two components separated by $.`);
      const comp = tokenKeySuffix(parts[0]!);
      if (second!.param.type === 'token')
        keys.push(indexKey(sp.code, `${comp}$${tokenKeySuffix(parts[1]!)}`));
      else if (second!.param.type === 'quantity')
        conds.push(this.numberExists(r, second!.param, [parts[1]!], [comp], sp.code));
      else conds.push(this.dateExists(r, sp.code, [parts[1]!], [comp]));
    }
    if (keys.length === 1 && conds.length === 0) {
      mustKeys.push(keys[0]!);
      return undefined;
    }
    if (keys.length > 0) conds.push(this.keysAny(r, keys));
    return this.ors(conds);
  }

  /** Chaining: the ids of matching targets are found first (bounded), then matched as keys. */
  private async chainKeys(f: Extract<Filter, { kind: 'chain' }>): Promise<string[]> {
    const keys: string[] = [];
    for (const target of f.targets) {
      if (!this.access.canRead(target)) continue;
      const inner = new Compiler(this.q, { ...this.access, patient: undefined });
      const { from, conds } = fenced(
        't',
        await inner.whereParts([{ ...f.inner, resourceType: target } as Filter], 't'),
      );
      const pid = inner.p.add(this.access.projectId);
      const ty = inner.p.add(target);
      const allowed = accessSql(this.access, target, 'read', 't', (v) => inner.p.add(v));
      const rows = await this.q.query<{ id: string }>(
        `SELECT t.id FROM ${from} WHERE t.project_id = ${pid} AND t.resource_type = ${ty} AND NOT t.deleted
           AND ${conds.join(' AND ') || 'true'}${allowed} LIMIT ${SEARCH_LIMITS.maxChainMatches + 1}`,
        inner.p.values,
      );
      for (const row of rows.rows) keys.push(indexKey(f.param.code, `${target}/${row.id}`));
      if (keys.length > SEARCH_LIMITS.maxChainMatches)
        tooCostly(
          `A chained parameter on '${f.param.code}' matches more than ${SEARCH_LIMITS.maxChainMatches} resources.`,
        );
    }
    return keys;
  }

  /** Reverse chaining: ids referenced by matching resources of the source type (bounded). */
  private async has(f: Extract<Filter, { kind: 'has' }>, r: string): Promise<string> {
    if (!this.access.canRead(f.source)) return 'false';
    const inner = new Compiler(this.q, { ...this.access, patient: undefined });
    const { from, conds } = fenced('s', await inner.whereParts([f.inner], 's'));
    const prefix = `${f.refParam.code}=${f.resourceType}/`;
    const allowed = accessSql(this.access, f.source, 'read', 's', (v) => inner.p.add(v));
    const rows = await this.q.query<{ id: string }>(
      `SELECT DISTINCT substr(k, ${prefix.length + 1}) AS id FROM ${from}, unnest(s.search_keys) k
        WHERE s.project_id = ${inner.p.add(this.access.projectId)} AND s.resource_type = ${inner.p.add(f.source)}
          AND NOT s.deleted AND ${conds.join(' AND ') || 'true'}${allowed} AND k LIKE ${inner.p.add(`${escapeLike(prefix)}%`)}
        LIMIT ${SEARCH_LIMITS.maxChainMatches + 1}`,
      inner.p.values,
    );
    if (rows.rows.length > SEARCH_LIMITS.maxChainMatches)
      tooCostly(
        `A _has parameter through ${f.source} matches more than ${SEARCH_LIMITS.maxChainMatches} resources.`,
      );
    return `${r}.id = ANY(${this.p.add(rows.rows.map((x) => x.id))}::text[])`;
  }

  /** The SQL value a sort key orders by, and its type for the cursor comparison. */
  sortExpr(key: SortKey, r: string): { sql: string; cast: string } {
    const code = key.param.code;
    if (code === '_id') return { sql: `${r}.id`, cast: 'text' };
    if (code === '_lastUpdated') return { sql: `${r}.last_updated`, cast: 'timestamptz' };
    const agg = key.desc ? 'max' : 'min';
    const own = (alias: string) =>
      `${alias}.project_id = ${r}.project_id AND ${alias}.resource_type = ${r}.resource_type AND ${alias}.id = ${r}.id AND ${alias}.code = ${this.p.add(code)}`;
    switch ((key.param as SearchParam | ColumnParam).type) {
      case 'string':
        return { sql: `(SELECT ${agg}(s.norm) FROM search_string s WHERE ${own('s')})`, cast: 'text' };
      case 'date':
        return {
          sql: `(SELECT ${agg}(d.${key.desc ? 'hi' : 'lo'}) FROM search_date d WHERE ${own('d')} AND d.comp IS NULL)`,
          cast: 'timestamptz',
        };
      case 'number':
      case 'quantity':
        return {
          sql: `(SELECT ${agg}(n.num) FROM search_number n WHERE ${own('n')} AND n.comp IS NULL)`,
          cast: 'numeric',
        };
      default: {
        // token, reference, uri: the key text after `code=`, tokens by their code (the `*|code` form).
        const prefix = (key.param as SearchParam).type === 'token' ? `${code}=*|` : `${code}=`;
        return {
          sql: `(SELECT ${agg}(substr(k, ${prefix.length + 1})) FROM unnest(${r}.search_keys) k WHERE k LIKE ${this.p.add(`${escapeLike(prefix)}%`)})`,
          cast: 'text',
        };
      }
    }
  }
}

interface WhereCtx {
  mustKeys: string[];
  gin: string[];
  pinpoint: boolean;
}

export interface WhereParts {
  gin: string[];
  rest: string[];
  pinpoint: boolean;
}

/**
 * Whether exact keys name one patient, one encounter or one identifier value: the GIN posting
 * list of such a key is that record's entries only (tens to thousands of rows, whatever the table
 * size), so the search should read it and nothing else. The planner cannot know this (a rare key's
 * estimate is a default) and, with random_page_cost 4, ANDs the probe with a scan of every row of
 * the type in the project (resource_last_updated): 0.6 ms for the 10,000 Encounters of 230,000
 * resources, growing with the table. References to other types (an Organization, a Practitioner)
 * and codes can match a large share of the table, where an ordered scan is better: not pinpoint.
 * Also applied to chains (the ids a chain found, as reference keys), the inner queries of chains
 * and `_has`, and `_revinclude` (whose keys name the rows already found).
 */
function pinpointKeys(sp: SearchParam, modifier: string | undefined, keys: string[]): boolean {
  if (keys.length === 0) return false;
  const value = (k: string) => k.slice(k.indexOf('=') + 1);
  if (sp.type === 'reference') {
    if (modifier === 'identifier') return keys.every((k) => !value(k).endsWith('|*'));
    return keys.every((k) => /^(Patient|Encounter)\/[A-Za-z0-9\-.]{1,64}$/.test(value(k)));
  }
  if (sp.type === 'token' && (sp.code === 'identifier' || modifier === 'of-type'))
    return keys.every((k) => !value(k).endsWith('|*') && !value(k).endsWith('|'));
  return false;
}

/** `http://a/b/c` → [`http://a/b/c`, `http://a/b`, `http://a`]: the uris a resource's value may be "above". */
function uriPrefixes(uri: string): string[] {
  const out = [uri];
  let cur = uri;
  while (cur.lastIndexOf('/') > cur.indexOf('//') + 1) {
    cur = cur.slice(0, cur.lastIndexOf('/'));
    out.push(cur);
  }
  return out;
}

function encodeCursor(c: Cursor): string {
  return Buffer.from(JSON.stringify(c)).toString('base64url');
}
function decodeCursor(s: string, sortCount: number): Cursor {
  try {
    const c = JSON.parse(Buffer.from(s, 'base64url').toString('utf8')) as Cursor;
    if (
      (c.d === 'n' || c.d === 'p') &&
      Array.isArray(c.v) &&
      c.v.length === sortCount &&
      c.v.every((x) => x === null || typeof x === 'string') &&
      typeof c.t === 'string' &&
      typeof c.i === 'string'
    )
      return c;
  } catch {
    // fall through
  }
  invalid('_cursor is not a cursor this server issued for this search.');
}

/**
 * Keyset condition "the row comes after (or before) the cursor position" for ORDER BY
 * e1 [DESC], …, resource_type, id with NULLS LAST on ascending and descending keys.
 */
function keysetCondition(
  exprs: { sql: string; cast: string; desc: boolean }[],
  cursor: Cursor,
  r: string,
  p: Params,
): string {
  const forward = cursor.d === 'n';
  const cols = [
    ...exprs.map((e, i) => ({ ...e, value: cursor.v[i] ?? null })),
    { sql: `${r}.resource_type`, cast: 'text', desc: false, value: cursor.t },
    { sql: `${r}.id`, cast: 'text', desc: false, value: cursor.i },
  ];
  const ors: string[] = [];
  for (let i = 0; i < cols.length; i++) {
    const eqs = cols
      .slice(0, i)
      .map((c) => (c.value === null ? `${c.sql} IS NULL` : `${c.sql} = ${p.add(c.value)}::${c.cast}`));
    const c = cols[i]!;
    // Ascending in the scan direction means "greater" going forward on an ASC key.
    const greater = forward !== c.desc;
    let cmp: string | undefined;
    if (c.value === null) {
      // NULLs sort last: nothing is after a NULL going forward; going back, every non-NULL is before it.
      cmp = forward ? undefined : `${c.sql} IS NOT NULL`;
    } else {
      const v = `${p.add(c.value)}::${c.cast}`;
      cmp = forward
        ? `(${c.sql} ${greater ? '>' : '<'} ${v} OR ${c.sql} IS NULL)`
        : `${c.sql} ${greater ? '>' : '<'} ${v}`;
    }
    if (cmp) ors.push([...eqs, cmp].join(' AND '));
  }
  return ors.length === 0 ? 'false' : `(${ors.map((x) => `(${x})`).join(' OR ')})`;
}

/**
 * The columns of a result row. `keys`: the SQL of the index keys the caller needs from each row
 * (see `neededKeys`); the whole search_keys array is not read back (its text-array parsing was the
 * largest single cost of a search in the server).
 */
const ROW_COLS = (r: string, keys: string) =>
  `${r}.resource_type, ${r}.id, ${r}.version_id, ${ISO_TIME(`${r}.last_updated`)} AS last_updated, ${r}.content::text AS json, ${r}.patients, ${keys} AS search_keys, ${r}.sealed`;

/** A timestamptz as the text of Date.toISOString() (millisecond precision, as written), not parsed in the server. */
const ISO_TIME = (col: string) => `to_char(${col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`;

/**
 * The index keys a search reads back from its rows: those of the `_include` parameters (forward
 * includes follow them) and, `exact`, the plain keys of blind-index criteria (the gateway re-checks
 * those; a plain key in the stored index decides it without decrypting). NULL when none are needed.
 */
function neededKeys(r: string, req: SearchRequest, p: Params, exact: readonly string[] = []): string {
  const prefixes = [...new Set(req.include.map((i) => `${escapeLike(`${i.param.code}=`)}%`))];
  const conds: string[] = [];
  if (prefixes.length > 0) conds.push(`k LIKE ANY(${p.add(prefixes)}::text[])`);
  if (exact.length > 0) conds.push(`k = ANY(${p.add([...new Set(exact)])}::text[])`);
  return conds.length === 0
    ? 'NULL::text[]'
    : `ARRAY(SELECT k FROM unnest(${r}.search_keys) k WHERE ${conds.join(' OR ')})`;
}

/**
 * The FROM item of a search over `resource` as `r`. With pinpoint probes (see `pinpointKeys`) the
 * GIN probes are fenced in a subquery (OFFSET 0 keeps the planner from merging it), so the
 * project, type and other conditions filter its few rows instead of being ANDed in as an index
 * scan over every row of the type; `where` then holds the other conditions.
 */
function fromClause(parts: WhereParts, base: string[]): { from: string; where: string } {
  const { from, conds } = fenced('r', parts);
  return { from, where: [...base, ...conds].join(' AND ') };
}

/** `fromClause` for any alias: the FROM item, and the conditions left for its WHERE. */
function fenced(alias: string, parts: WhereParts): { from: string; conds: string[] } {
  if (parts.pinpoint && parts.gin.length > 0)
    return {
      from: `(SELECT * FROM resource ${alias} WHERE ${parts.gin.join(' AND ')} OFFSET 0) ${alias}`,
      conds: parts.rest,
    };
  return { from: `resource ${alias}`, conds: [...parts.gin, ...parts.rest] };
}

interface DbRow {
  resource_type: string;
  id: string;
  version_id: number;
  last_updated: string | Date;
  json: string;
  patients: string[];
  search_keys: string[];
  sealed: Record<string, string> | null;
  [k: string]: unknown;
}
function toRow(x: DbRow): SearchRow {
  return {
    resourceType: x.resource_type,
    id: x.id,
    versionId: Number(x.version_id),
    lastUpdated: typeof x.last_updated === 'string' ? x.last_updated : x.last_updated.toISOString(),
    json: x.json,
    patients: x.patients ?? [],
    keys: x.search_keys ?? [],
    sealed: x.sealed ?? undefined,
  };
}

/** ` AND <predicate>` for one type, or '' when the access puts no restriction on it. */
function accessSql(
  access: SearchAccess,
  type: string,
  use: 'match' | 'read',
  r: string,
  add: (v: unknown) => string,
): string {
  const pred = access.predicate?.(type, use);
  return !pred || pred.op === 'true' ? '' : ` AND ${predicateSql(pred, r, add)}`;
}

/**
 * The access condition over rows of several types: each type's predicate, guarded by its type
 * (`(type = A AND pA) OR (type = B AND pB)`); undefined when no type is restricted.
 */
function typesAccessSql(
  access: SearchAccess,
  types: readonly string[],
  use: 'match' | 'read',
  r: string,
  add: (v: unknown) => string,
): string | undefined {
  if (!access.predicate) return undefined;
  const preds = types.map((t) => ({ t, pred: access.predicate!(t, use) }));
  if (preds.every((x) => x.pred.op === 'true')) return undefined;
  if (preds.length === 1) return predicateSql(preds[0]!.pred, r, add);
  return `(${
    preds
      .filter((x) => x.pred.op !== 'false')
      .map((x) => `(${r}.resource_type = ${add(x.t)} AND ${predicateSql(x.pred, r, add)})`)
      .join(' OR ') || 'false'
  })`;
}

/** Runs a search (matches, includes, total, cursors) inside `q` (the gateway gives a read transaction). */
export async function runSearch(
  q: SqlQueryable,
  req: SearchRequest,
  access: SearchAccess,
): Promise<SearchPage> {
  try {
    return await runSearchUnchecked(q, req, access);
  } catch (e) {
    const kind = classifyDatabaseError(e);
    if (kind === 'data_exception')
      invalid('A value could not be used in the search (out of range or malformed).');
    if (kind === 'canceled') tooCostly('The search took longer than the server allows; narrow it.');
    throw e;
  }
}

/**
 * The query plan (EXPLAIN, text) of a search's page query, after its chain and _has pre-queries:
 * what test/search-uscore.test.ts checks for index use.
 */
export async function explainSearch(
  q: SqlQueryable,
  req: SearchRequest,
  access: SearchAccess,
): Promise<string> {
  const out = { plan: '' };
  await runSearchUnchecked(q, { ...req, total: 'none' }, access, out);
  return out.plan;
}

async function runSearchUnchecked(
  q: SqlQueryable,
  req: SearchRequest,
  access: SearchAccess,
  explain?: { plan: string },
): Promise<SearchPage> {
  const warnings: IssueDetail[] = [];
  const types = req.types.filter((t) => access.canRead(t));
  const c = new Compiler(q, access);
  const base = [`r.project_id = ${c.p.add(access.projectId)}`, 'NOT r.deleted'];
  base.push(
    types.length === 1
      ? `r.resource_type = ${c.p.add(types[0])}`
      : `r.resource_type = ANY(${c.p.add(types)}::text[])`,
  );
  const allowed = typesAccessSql(access, types, 'match', 'r', (v) => c.p.add(v));
  if (allowed) base.push(allowed);
  const parts = await c.whereParts(req.filters, 'r');
  // A compartment is a pinpoint probe too (the GIN index on patients).
  if (access.patient !== undefined) {
    parts.gin.push(`r.patients @> ${c.p.add([access.patient])}::text[]`);
    parts.pinpoint = true;
  }
  const { from, where } = fromClause(parts, base);
  const whereParams = [...c.p.values];
  const sortExprs = req.sort.map((k) => ({ ...c.sortExpr(k, 'r'), desc: k.desc }));

  let total: number | undefined;
  const wantTotal = req.summary === 'count' ? 'accurate' : req.total;
  if (wantTotal === 'accurate') {
    const t = await q.query<{ n: string | number }>(
      `SELECT count(*) AS n FROM ${from} WHERE ${where}`,
      whereParams,
      { prepare: true },
    );
    total = Number(t.rows[0]?.n ?? 0);
  } else if (wantTotal === 'estimate') {
    const plan = await q.query<{ 'QUERY PLAN': unknown }>(
      `EXPLAIN (FORMAT JSON) SELECT 1 FROM ${from} WHERE ${where}`,
      whereParams,
    );
    const json = plan.rows[0]?.['QUERY PLAN'];
    const parsedPlan = (typeof json === 'string' ? JSON.parse(json) : json) as {
      Plan: { 'Plan Rows': number };
    }[];
    total = Math.round(parsedPlan[0]?.Plan['Plan Rows'] ?? 0);
  }
  if (req.summary === 'count' || req.count === 0)
    return { matches: [], includes: [], total, warnings, blindChecks: c.blindChecks };

  const cursor = req.cursor === undefined ? undefined : decodeCursor(req.cursor, sortExprs.length);
  const pageConds = cursor ? [where, keysetCondition(sortExprs, cursor, 'r', c.p)] : [where];
  const backward = cursor?.d === 'p';
  // Forward pages put NULLs last on every key; a backward page reads the same order reversed.
  const dir = (desc: boolean) =>
    `${desc !== backward ? 'DESC' : 'ASC'} ${backward ? 'NULLS FIRST' : 'NULLS LAST'}`;
  const order = [
    ...sortExprs.map((e, i) => `s${i} ${dir(e.desc)}`),
    `r.resource_type ${backward ? 'DESC' : 'ASC'}`,
    `r.id ${backward ? 'DESC' : 'ASC'}`,
  ];
  const keys = neededKeys(
    'r',
    req,
    c.p,
    c.blindChecks.flatMap((b) => b.keys),
  );
  const pageSql = `SELECT ${ROW_COLS('r', keys)}${sortExprs.map((e, i) => `, ${e.sql} AS s${i}, (${e.sql})::text AS t${i}`).join('')}
       FROM ${from} WHERE ${pageConds.join(' AND ')} ORDER BY ${order.join(', ')} LIMIT ${req.count + 1}`;
  if (explain) {
    const plan = await q.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${pageSql}`, c.p.values);
    explain.plan = plan.rows.map((r) => r['QUERY PLAN']).join('\n');
    return { matches: [], includes: [], warnings, blindChecks: [] };
  }
  const rows = await q.query<DbRow>(pageSql, c.p.values, { prepare: true });
  const more = rows.rows.length > req.count;
  const page = rows.rows.slice(0, req.count);
  if (backward) page.reverse();
  const position = (x: DbRow, d: 'n' | 'p') =>
    encodeCursor({
      d,
      v: sortExprs.map((_, i) => (x[`t${i}`] as string | null) ?? null),
      t: x.resource_type,
      i: x.id,
    });
  const first = page[0];
  const last = page[page.length - 1];
  const next = last && (backward ? true : more) ? position(last, 'n') : undefined;
  const previous = first && (backward ? more : cursor !== undefined) ? position(first, 'p') : undefined;
  if (total === undefined && req.total !== 'none' && !cursor && !more) total = page.length;

  const matches = page.map(toRow);
  const includes = await fetchIncludes(q, req, access, matches, warnings);
  return { matches, includes, total, next, previous, warnings, blindChecks: c.blindChecks };
}

/** _include and _revinclude (with :iterate), bounded, and only of types the caller may read. */
async function fetchIncludes(
  q: SqlQueryable,
  req: SearchRequest,
  access: SearchAccess,
  matches: SearchRow[],
  warnings: IssueDetail[],
): Promise<SearchRow[]> {
  if (req.include.length === 0 && req.revinclude.length === 0) return [];
  const seen = new Set(matches.map((m) => `${m.resourceType}/${m.id}`));
  const out: SearchRow[] = [];
  let frontier = matches;
  let refused = false;
  for (let depth = 0; depth <= SEARCH_LIMITS.maxIterateDepth && frontier.length > 0; depth++) {
    const found: SearchRow[] = [];
    const incs = req.include.filter((i) => depth === 0 || i.iterate);
    const revs = req.revinclude.filter((i) => depth === 0 || i.iterate);
    // Forward: the references are in the index keys of the rows already found.
    const wanted = new Map<string, [string, string]>();
    for (const inc of incs) {
      const prefix = `${inc.param.code}=`;
      for (const row of frontier) {
        if (row.resourceType !== inc.source) continue;
        for (const k of row.keys) {
          if (!k.startsWith(prefix)) continue;
          const m = /^([A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})$/.exec(k.slice(prefix.length));
          if (!m || (inc.target && m[1] !== inc.target)) continue;
          if (!access.canRead(m[1]!)) {
            refused = true;
            continue;
          }
          const ref = `${m[1]}/${m[2]}`;
          if (!seen.has(ref)) wanted.set(ref, [m[1]!, m[2]!]);
        }
      }
    }
    if (wanted.size > 0) {
      const pairs = [...wanted.values()].slice(0, SEARCH_LIMITS.maxIncludes + 1);
      const p = new Params();
      const allowed = typesAccessSql(access, [...new Set(pairs.map((x) => x[0]))], 'read', 'r', (v) =>
        p.add(v),
      );
      const res = await q.query<DbRow>(
        `SELECT ${ROW_COLS('r', neededKeys('r', req, p))} FROM resource r JOIN unnest(${p.add(pairs.map((x) => x[0]))}::text[], ${p.add(pairs.map((x) => x[1]))}::text[]) AS k(t, i)
           ON r.resource_type = k.t AND r.id = k.i
         WHERE r.project_id = ${p.add(access.projectId)} AND NOT r.deleted${allowed ? ` AND ${allowed}` : ''}`,
        p.values,
        { prepare: true },
      );
      found.push(...res.rows.map(toRow));
    }
    // Reverse: resources of the source type whose reference keys name a row already found.
    for (const rev of revs) {
      if (!access.canRead(rev.source)) {
        refused = true;
        continue;
      }
      const keys = frontier
        .filter((row) => !rev.target || row.resourceType === rev.target)
        .map((row) => indexKey(rev.param.code, `${row.resourceType}/${row.id}`));
      if (keys.length === 0) continue;
      const p = new Params();
      // The keys name the rows just found: a pinpoint probe (see `pinpointKeys`), fenced, or the planner
      // ANDs it with a scan of every row of the source type (every Provenance, for US Core's
      // _revinclude=Provenance:target: half the table after a Synthea import).
      const res = await q.query<DbRow>(
        `SELECT ${ROW_COLS('r', neededKeys('r', req, p))}
           FROM (SELECT * FROM resource r WHERE r.search_keys && ${p.add(keys)}::text[] OFFSET 0) r
          WHERE r.project_id = ${p.add(access.projectId)} AND r.resource_type = ${p.add(rev.source)} AND NOT r.deleted
           ${access.patient !== undefined ? `AND r.patients @> ${p.add([access.patient])}::text[]` : ''}${accessSql(access, rev.source, 'read', 'r', (v) => p.add(v))}
         LIMIT ${SEARCH_LIMITS.maxIncludes + 1}`,
        p.values,
        { prepare: true },
      );
      found.push(...res.rows.map(toRow));
    }
    const fresh = found.filter((row) => {
      const ref = `${row.resourceType}/${row.id}`;
      if (seen.has(ref)) return false;
      seen.add(ref);
      return true;
    });
    out.push(...fresh);
    if (out.length > SEARCH_LIMITS.maxIncludes) {
      out.length = SEARCH_LIMITS.maxIncludes;
      warnings.push({
        severity: 'warning',
        code: 'too-costly',
        diagnostics: `Included resources were cut at ${SEARCH_LIMITS.maxIncludes} for this page; use a smaller _count.`,
      });
      break;
    }
    frontier = fresh;
  }
  if (refused)
    warnings.push({
      severity: 'information',
      code: 'suppressed',
      diagnostics: 'Some included resources were left out: your access does not cover their type.',
    });
  return out;
}

/** Ids of live resources matching `req` (conditional create/update/delete), at most `limit`. */
export async function searchIds(
  q: SqlQueryable,
  req: SearchRequest,
  access: SearchAccess,
  limit: number,
  checks: BlindCheck[] = [],
): Promise<string[]> {
  const c = new Compiler(q, access);
  const base = [
    `r.project_id = ${c.p.add(access.projectId)}`,
    'NOT r.deleted',
    `r.resource_type = ${c.p.add(req.types[0])}`,
  ];
  const allowed = typesAccessSql(access, [req.types[0]!], 'read', 'r', (v) => c.p.add(v));
  if (allowed) base.push(allowed);
  const { from, where } = fromClause(await c.whereParts(req.filters, 'r'), base);
  try {
    const rows = await q.query<{ id: string }>(
      `SELECT r.id FROM ${from} WHERE ${where} LIMIT ${limit}`,
      c.p.values,
    );
    checks.push(...c.blindChecks);
    return rows.rows.map((x) => x.id);
  } catch (e) {
    if (classifyDatabaseError(e) === 'data_exception') invalid('A value could not be used in the condition.');
    throw e;
  }
}
