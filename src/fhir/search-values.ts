/**
 * Values of FHIR R4 search parameters (https://hl7.org/fhir/R4/search.html §3.1.1.4): prefixes,
 * dates, numbers, quantities and strings, parsed into ranges and SQL predicates.
 *
 * Pure functions: no database, no I/O. The SQL they produce is a boolean expression over fixed
 * column names (`lo`/`hi` for dates, `num` for numbers) with `$1`, `$2`… placeholders numbered
 * from 1; the caller aliases its columns and shifts the placeholders with `renumber`. Values
 * travel only as parameters, never spliced into the SQL text.
 *
 * Errors: invalid input throws `SearchValueError`, whose `detail` quotes the offending value so
 * the caller who sent it can fix it. That text is for that caller only (a search value can be
 * PHI, e.g. a birth date): translate it into a `CustosError` before it leaves the search layer,
 * and never log `detail`.
 */

/** An invalid search value. `detail` says exactly what was wrong, quoting the (truncated) value. */
export class SearchValueError extends Error {
  readonly detail: string;
  constructor(detail: string) {
    super(detail);
    this.name = 'SearchValueError';
    this.detail = detail;
  }
}

/** Quotes a caller's value for a detail, escaped (control characters stay visible) and short. */
function quote(value: string): string {
  return JSON.stringify(value.length > 48 ? `${value.slice(0, 48)}…` : value);
}

/** A SQL boolean expression with `$1`… placeholders, and their values in order. */
export interface SqlPredicate {
  sql: string;
  params: string[];
}

// ---------------------------------------------------------------------------------------------
// Prefixes

export type Prefix = 'eq' | 'ne' | 'gt' | 'lt' | 'ge' | 'le' | 'sa' | 'eb' | 'ap';

const PREFIXES: ReadonlySet<string> = new Set<Prefix>(['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap']);

function isPrefix(s: string): s is Prefix {
  return PREFIXES.has(s);
}

/**
 * Splits the comparison prefix off an ordered (date, number, quantity) search value; none means
 * `eq`. Two lower-case letters followed by a digit or '-' look like a prefix: when they are not
 * one of the nine we refuse rather than fail later with a confusing "not a valid date".
 */
export function splitPrefix(raw: string): { prefix: Prefix; value: string } {
  const head = raw.slice(0, 2);
  if (isPrefix(head)) return { prefix: head, value: raw.slice(2) };
  if (/^[a-z]{2}[0-9-]/.test(raw)) {
    throw new SearchValueError(
      `unknown search prefix ${quote(head)}: expected one of eq, ne, gt, lt, ge, le, sa, eb, ap`,
    );
  }
  return { prefix: 'eq', value: raw };
}

// ---------------------------------------------------------------------------------------------
// Dates

/**
 * A half-open interval of instants: `lo` inclusive, `hi` exclusive. Each bound is an ISO-8601 UTC
 * instant with millisecond precision (`2019-03-01T00:00:00.000Z`) or the PostgreSQL timestamptz
 * literal `-infinity` / `infinity` (an open end, e.g. a Period without start or end).
 */
export interface InstantRange {
  lo: string;
  hi: string;
}

/**
 * The zone of values written without one (a date, or a time without Z or offset). R4 lets the
 * server choose ("the server may take the local time zone"); a server's local zone would make
 * results depend on where it runs, so we fix UTC. A birth date `1970-01-01` is thus the UTC day.
 */
export const IMPLICIT_ZONE = 'UTC';

const MS_PER_MINUTE = 60_000;
const MS_PER_DAY = 86_400_000;
/** Every 400 Gregorian years have exactly this many days; used to dodge Date.UTC's 0-99 → 1900s. */
const MS_PER_400_YEARS = 146_097 * MS_PER_DAY;
/** FHIR years are 0001-9999; instants outside [MIN_MS, MAX_MS) become ±infinity. */
const MIN_MS = utcMs(1, 1, 1);
const MAX_MS = utcMs(10_000, 1, 1);
/** Fractional seconds beyond nanoseconds are refused: no use, and unbounded digits cost BigInt time. */
const MAX_FRACTION_DIGITS = 9;

function utcMs(year: number, month: number, day: number, h = 0, mi = 0, s = 0, ms = 0): number {
  // Date.UTC maps years 0-99 to 1900-1999; shifting by 400 years (same calendar) avoids that.
  return Date.UTC(year + 400, month - 1, day, h, mi, s, ms) - MS_PER_400_YEARS;
}

function isLeapYear(y: number): boolean {
  return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
}

function daysInMonth(y: number, m: number): number {
  return m === 2 ? (isLeapYear(y) ? 29 : 28) : [4, 6, 9, 11].includes(m) ? 30 : 31;
}

/**
 * Formats epoch milliseconds as a range bound. Outside years 0001-9999 (reachable only through a
 * zone offset or the end of year 9999) the bound becomes ±infinity: no FHIR value lies there, and
 * PostgreSQL reads neither year 0 nor `+010000-…` from toISOString.
 */
function formatInstant(ms: number): string {
  if (ms < MIN_MS) return '-infinity';
  if (ms >= MAX_MS) return 'infinity';
  return new Date(ms).toISOString();
}

/** Parses a range bound back to epoch ms (±Infinity for the infinities). Programmer errors throw. */
function instantMs(bound: string): number {
  if (bound === '-infinity') return -Infinity;
  if (bound === 'infinity') return Infinity;
  const ms = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/.test(bound) ? Date.parse(bound) : NaN;
  if (Number.isNaN(ms)) throw new RangeError('not an InstantRange bound');
  return ms;
}

// Structure only; ranges are checked one by one below so the detail can name the bad field.
const DATE_SHAPE =
  /^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$/;

/**
 * The instants a FHIR date, dateTime or instant denotes at its precision: `2019` is the whole
 * year, `2019-03-04T10:20` the whole minute, `…:30.5` 100 ms. Zone-less values are in
 * IMPLICIT_ZONE. Fractions finer than a millisecond are widened outward to whole milliseconds,
 * so the range still contains every instant the value denotes.
 */
export function dateRange(value: string): InstantRange {
  const bad = (why: string): SearchValueError =>
    new SearchValueError(`date value ${quote(value)} is not a valid FHIR date: ${why}`);
  if (value === '') throw new SearchValueError('date value is empty');
  if (value.trim() !== value) throw bad('it has leading or trailing whitespace');
  const m = DATE_SHAPE.exec(value);
  if (!m) {
    throw bad('expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.sss]][Z|+hh:mm|-hh:mm]');
  }
  const [, ys, mos, ds, hs, mis, ss, frac, zone] = m;
  const year = Number(ys);
  if (year < 1) throw bad('year 0000 does not exist (years are 0001-9999)');
  const month = mos === undefined ? undefined : Number(mos);
  if (month !== undefined && (month < 1 || month > 12)) throw bad(`month ${mos} is not in 01..12`);
  const day = ds === undefined ? undefined : Number(ds);
  if (day !== undefined && (day < 1 || day > daysInMonth(year, month ?? 1))) {
    throw bad(`day ${ds} does not exist in ${ys}-${mos}`);
  }
  // Date-only precisions carry no zone: they are IMPLICIT_ZONE (UTC) days, months, years.
  if (month === undefined) {
    return { lo: formatInstant(utcMs(year, 1, 1)), hi: formatInstant(utcMs(year + 1, 1, 1)) };
  }
  if (day === undefined) {
    return { lo: formatInstant(utcMs(year, month, 1)), hi: formatInstant(utcMs(year, month + 1, 1)) };
  }
  if (hs === undefined || mis === undefined) {
    const lo = utcMs(year, month, day);
    return { lo: formatInstant(lo), hi: formatInstant(lo + MS_PER_DAY) };
  }

  const hour = Number(hs);
  const minute = Number(mis);
  const second = ss === undefined ? 0 : Number(ss);
  // 24:00 is outside R4's grammar. R4's regex admits second 60, but neither PostgreSQL nor JS has
  // leap seconds on its timeline; refusing beats silently turning :60 into the next minute.
  if (hour > 23) throw bad(`hour ${hs} is not in 00..23`);
  if (minute > 59) throw bad(`minute ${mis} is not in 00..59`);
  if (second > 59) throw bad(`second ${ss} is not in 00..59`);
  let offsetMin = 0;
  if (zone !== undefined && zone !== 'Z') {
    const oh = Number(zone.slice(1, 3));
    const om = Number(zone.slice(4, 6));
    if (om > 59 || oh * 60 + om > 14 * 60) throw bad(`time zone offset ${zone} is outside -14:00..+14:00`);
    offsetMin = (zone.startsWith('-') ? -1 : 1) * (oh * 60 + om);
  }
  // Local wall time minus its offset is UTC.
  const start = utcMs(year, month, day, hour, minute, second) - offsetMin * MS_PER_MINUTE;

  if (ss === undefined) return { lo: formatInstant(start), hi: formatInstant(start + MS_PER_MINUTE) };
  if (frac === undefined) return { lo: formatInstant(start), hi: formatInstant(start + 1000) };
  if (frac.length > MAX_FRACTION_DIGITS) throw bad(`more than ${MAX_FRACTION_DIGITS} fractional digits`);
  // [f, f+1) in units of 10^-n s, widened to whole ms: floor below, ceiling above.
  const f = BigInt(frac);
  const scale = 10n ** BigInt(frac.length);
  const loMs = Number((f * 1000n) / scale);
  const hiMs = Number(((f + 1n) * 1000n + scale - 1n) / scale);
  return { lo: formatInstant(start + loMs), hi: formatInstant(start + hiMs) };
}

/**
 * The range of a FHIR Period: from the start of `start` to the end of `end` (each at its own
 * precision), open where missing; undefined when both are missing (nothing to index). A period
 * ending before it starts is refused, as R4's invariant per-1 does.
 */
export function periodRange(start: string | undefined, end: string | undefined): InstantRange | undefined {
  if (start === undefined && end === undefined) return undefined;
  const lo = start === undefined ? '-infinity' : dateRange(start).lo;
  const hi = end === undefined ? 'infinity' : dateRange(end).hi;
  const a = instantMs(lo);
  const b = instantMs(hi);
  if (a > b || (a === b && Number.isFinite(a))) {
    throw new SearchValueError(
      `period start ${quote(start ?? '')} is not before its end ${quote(end ?? '')}`,
    );
  }
  return { lo, hi };
}

/**
 * The search range for `ap`, widened on each side by 10% of the gap between the range and `now`
 * (R4's recommendation), but by at least 12 hours, so the total widening is at least a day. The
 * floor makes `ap` of today (gap 0) and of yesterday (gap tiny) mean "give or take a day" alike,
 * rather than jumping between exact and approximate.
 */
function approxRange(search: InstantRange, now: Date): InstantRange {
  const n = now.getTime();
  if (Number.isNaN(n)) throw new RangeError('now is an invalid Date');
  const sLo = instantMs(search.lo);
  const sHi = instantMs(search.hi);
  const gap = n < sLo ? sLo - n : n >= sHi ? n - sHi : 0;
  const widen = Number.isFinite(gap) ? Math.max(gap / 10, MS_PER_DAY / 2) : MS_PER_DAY / 2;
  return { lo: formatInstant(Math.floor(sLo - widen)), hi: formatInstant(Math.ceil(sHi + widen)) };
}

/**
 * SQL for a date search, over columns `lo` (inclusive) and `hi` (exclusive) holding the indexed
 * value's range (NOT NULL; ±infinity for open ends). Semantics are R4's literal ones (S the search
 * range, R the resource's): eq R ⊆ S; ne not eq; gt/lt some of R above/below S; ge gt or eq; le lt
 * or eq; sa R starts at or after S's end; eb R ends at or before S's start; ap R overlaps S
 * widened (see approxRange).
 *
 * Each form is a plain `column op parameter` comparison (or an AND/OR of them) so a btree on
 * (…, lo) or (…, hi) serves it. ne, ge and le are written in equivalent simpler forms than the
 * definitions, using lo < hi for every row: `ne` = `lo < sLo OR hi > sHi` (De Morgan on eq),
 * `ge` = `hi > sHi OR lo >= sLo` (gt ∨ (lo ≥ sLo ∧ ¬gt)), `le` = `lo < sLo OR hi <= sHi`.
 * `dateMatches` keeps the literal definitions; a test checks the two agree on PostgreSQL.
 */
export function datePredicate(prefix: Prefix, search: InstantRange, now: Date = new Date()): SqlPredicate {
  const p = (n: number): string => `$${n}::timestamptz`;
  switch (prefix) {
    case 'eq':
      return { sql: `(lo >= ${p(1)} AND hi <= ${p(2)})`, params: [search.lo, search.hi] };
    case 'ne':
      return { sql: `(lo < ${p(1)} OR hi > ${p(2)})`, params: [search.lo, search.hi] };
    case 'gt':
      return { sql: `hi > ${p(1)}`, params: [search.hi] };
    case 'lt':
      return { sql: `lo < ${p(1)}`, params: [search.lo] };
    case 'ge':
      return { sql: `(hi > ${p(1)} OR lo >= ${p(2)})`, params: [search.hi, search.lo] };
    case 'le':
      return { sql: `(lo < ${p(1)} OR hi <= ${p(2)})`, params: [search.lo, search.hi] };
    case 'sa':
      return { sql: `lo >= ${p(1)}`, params: [search.hi] };
    case 'eb':
      return { sql: `hi <= ${p(1)}`, params: [search.lo] };
    case 'ap': {
      const w = approxRange(search, now);
      return { sql: `(lo < ${p(1)} AND hi > ${p(2)})`, params: [w.hi, w.lo] };
    }
    default:
      return unreachable(prefix);
  }
}

/** `datePredicate`'s semantics in memory, written as R4 defines them (not in the SQL's forms). */
export function dateMatches(
  prefix: Prefix,
  search: InstantRange,
  resource: InstantRange,
  now: Date = new Date(),
): boolean {
  const sLo = instantMs(search.lo);
  const sHi = instantMs(search.hi);
  const lo = instantMs(resource.lo);
  const hi = instantMs(resource.hi);
  const eq = lo >= sLo && hi <= sHi;
  const gt = hi > sHi;
  const lt = lo < sLo;
  switch (prefix) {
    case 'eq':
      return eq;
    case 'ne':
      return !eq;
    case 'gt':
      return gt;
    case 'lt':
      return lt;
    case 'ge':
      return gt || eq;
    case 'le':
      return lt || eq;
    case 'sa':
      return lo >= sHi;
    case 'eb':
      return hi <= sLo;
    case 'ap': {
      const w = approxRange(search, now);
      return lo < instantMs(w.hi) && hi > instantMs(w.lo);
    }
    default:
      return unreachable(prefix);
  }
}

/**
 * Shifts every placeholder `$n` to `$(n+offset)`, to combine predicates in one statement. Our
 * SQL has no string literals or dollar quoting, so a plain `$digits` scan is exact.
 */
export function renumber(sql: string, offset: number): string {
  if (!Number.isInteger(offset) || offset < 0) throw new RangeError('offset must be a non-negative integer');
  return sql.replace(/\$(\d+)/g, (_, n: string) => `$${Number(n) + offset}`);
}

function unreachable(x: never): never {
  throw new RangeError(`unknown prefix ${String(x)}`);
}

// ---------------------------------------------------------------------------------------------
// Numbers
//
// Decimals are exact: a value is a BigInt of digits times a power of ten, never a float, so
// `0.1` and its ranges reach PostgreSQL `numeric` exactly as written.

/** A number search value: its implicit range [lo, hi) and the exact value, as decimal strings. */
export interface NumberRange {
  lo: string;
  hi: string;
  value: string;
}

/** digits × 10^exp. */
interface Decimal {
  digits: bigint;
  exp: number;
}

// FHIR decimal (R4 datatypes: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?).
const DECIMAL = /^(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?$/;
/** Bounds on digits and scale: far beyond any measurement, well within PostgreSQL numeric. */
const MAX_DECIMAL_DIGITS = 1000;
const MAX_DECIMAL_EXP = 1000;

function parseDecimal(raw: string, what: string): Decimal {
  const bad = (why: string): SearchValueError =>
    new SearchValueError(`${what} ${quote(raw)} is not a valid FHIR decimal: ${why}`);
  if (raw === '') throw new SearchValueError(`${what} is empty`);
  const m = DECIMAL.exec(raw);
  if (!m) throw bad('expected digits with an optional sign, fraction and exponent, like -0.5 or 1e2');
  const [, sign, int = '', frac = '', e] = m;
  if (int.length + frac.length > MAX_DECIMAL_DIGITS) throw bad(`more than ${MAX_DECIMAL_DIGITS} digits`);
  const exp = (e === undefined ? 0 : Number(e)) - frac.length;
  if (!Number.isSafeInteger(exp) || Math.abs(exp) > MAX_DECIMAL_EXP) throw bad('exponent out of range');
  const digits = BigInt(int + frac);
  return { digits: sign === '-' ? -digits : digits, exp };
}

/** Plain decimal notation (what PostgreSQL numeric reads), keeping the given scale. */
function formatDecimal({ digits, exp }: Decimal): string {
  if (exp >= 0) return (digits * 10n ** BigInt(exp)).toString();
  const neg = digits < 0n;
  const abs = (neg ? -digits : digits).toString().padStart(-exp + 1, '0');
  const point = abs.length + exp;
  return `${neg ? '-' : ''}${abs.slice(0, point)}.${abs.slice(point)}`;
}

/** Re-expresses d at a smaller exponent (more digits), exactly. */
function atExp(d: Decimal, exp: number): bigint {
  return d.digits * 10n ** BigInt(d.exp - exp);
}

/**
 * The implicit range of a number search value: ± half a unit of its last significant digit, as
 * R4 §3.1.1.4.1 says: `100` → [99.5, 100.5), `100.00` → [99.995, 100.005). For `1e2` (one
 * significant figure) that is [50, 150); R4's table prints [95 ... 105), which contradicts its
 * own "1 significant figure", so we follow the rule, not the typo.
 */
export function numberRange(value: string): NumberRange {
  const d = parseDecimal(value, 'number value');
  // Half a unit of the last digit is 5 at one exponent lower.
  const ten = d.digits * 10n;
  const exp = d.exp - 1;
  return {
    lo: formatDecimal({ digits: ten - 5n, exp }),
    hi: formatDecimal({ digits: ten + 5n, exp }),
    value: formatDecimal(d),
  };
}

/**
 * SQL for a number search over a numeric column `num` holding the resource's exact value. eq/ne
 * use the implicit range; gt/lt/ge/le compare with the exact value (R4: "lt100 — values less than
 * exactly 100"); sa/eb mean gt/lt for a point value.
 *
 * ap: within ±10% of the value (inclusive; bounds swapped for a negative value), and never
 * narrower than eq's range: plain ±10% would make `ap0` mean exactly 0, and `ap0.001` stricter
 * than `eq0.001`, which no reading of "approximately" intends.
 */
export function numberPredicate(prefix: Prefix, v: NumberRange): SqlPredicate {
  const p = (n: number): string => `$${n}::numeric`;
  switch (prefix) {
    case 'eq':
      return { sql: `(num >= ${p(1)} AND num < ${p(2)})`, params: [v.lo, v.hi] };
    case 'ne':
      return { sql: `(num < ${p(1)} OR num >= ${p(2)})`, params: [v.lo, v.hi] };
    case 'gt':
    case 'sa':
      return { sql: `num > ${p(1)}`, params: [v.value] };
    case 'lt':
    case 'eb':
      return { sql: `num < ${p(1)}`, params: [v.value] };
    case 'ge':
      return { sql: `num >= ${p(1)}`, params: [v.value] };
    case 'le':
      return { sql: `num <= ${p(1)}`, params: [v.value] };
    case 'ap': {
      const value = parseDecimal(v.value, 'number value');
      const lo = parseDecimal(v.lo, 'number lower bound');
      const hi = parseDecimal(v.hi, 'number upper bound');
      const exp = Math.min(value.exp - 1, lo.exp, hi.exp);
      const a = atExp(value, exp);
      // 0.9·v and 1.1·v at one exponent lower are 9·v and 11·v.
      const nine = (a * 9n) / 10n;
      const eleven = (a * 11n) / 10n;
      const min = [nine, eleven, atExp(lo, exp)].reduce((x, y) => (y < x ? y : x));
      const max = [nine, eleven, atExp(hi, exp)].reduce((x, y) => (y > x ? y : x));
      return {
        sql: `(num >= ${p(1)} AND num <= ${p(2)})`,
        params: [formatDecimal({ digits: min, exp }), formatDecimal({ digits: max, exp })],
      };
    }
    default:
      return unreachable(prefix);
  }
}

// ---------------------------------------------------------------------------------------------
// Quantities

export interface QuantitySearch {
  prefix: Prefix;
  number: NumberRange;
  system?: string;
  code?: string;
}

/**
 * A quantity search value (R4 §3.1.1.4.8): `[prefix]number`, `[prefix]number|system|code` or
 * `[prefix]number||code` (any system). Every `|` separates; FHIR's `\|` escape is not decoded
 * here (no UCUM code or system URI contains a `|`). A bare `number|x` is refused: R4 defines no
 * two-part form, and guessing whether `x` is a system or a code would silently change results.
 */
export function parseQuantity(raw: string): QuantitySearch {
  const parts = raw.split('|');
  if (parts.length !== 1 && parts.length !== 3) {
    throw new SearchValueError(
      `quantity value ${quote(raw)} has ${parts.length} '|'-separated parts: ` +
        'expected number, number|system|code or number||code',
    );
  }
  const [num = '', system = '', code = ''] = parts;
  const { prefix, value } = splitPrefix(num);
  const out: QuantitySearch = { prefix, number: numberRange(value) };
  if (parts.length === 3) {
    if (code === '') {
      throw new SearchValueError(`quantity value ${quote(raw)} has no code after the second '|'`);
    }
    if (system !== '') out.system = system;
    out.code = code;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Strings

/**
 * The form both sides take for R4 string matching, which is case- and accent-insensitive:
 * compatibility-decomposed (NFKD: `ﬁ` → `fi`, `Å` → `A` + ring), combining marks dropped,
 * lower-cased, whitespace runs collapsed to one space, trimmed. Decomposition runs again after
 * lower-casing because lower-casing can itself produce a mark (`İ` → `i` + dot above).
 */
export function normalizeString(s: string): string {
  return s
    .normalize('NFKD')
    .toLowerCase()
    .normalize('NFKD')
    .replace(/\p{M}/gu, '')
    .replace(/\s+/gu, ' ')
    .trim();
}

/** Escapes LIKE's metacharacters for `… LIKE $1 ESCAPE '\'`, so a caller's `%` or `_` is literal. */
export function escapeLike(s: string): string {
  return s.replace(/[\\%_]/g, '\\$&');
}
