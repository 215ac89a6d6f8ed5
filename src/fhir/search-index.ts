import { createHash } from 'node:crypto';
import { evalFhirPathTyped, type TypedValue } from '@medplum/core';
import { searchParameters, type SearchParam } from './search-parameters.ts';
import { dateRange, normalizeString, periodRange, type InstantRange } from './search-values.ts';

/**
 * What a resource version contributes to the search index. Everything the search engine can
 * match is in here, and nothing else: this is the one place index rows are produced (the
 * encryption issue turns protected elements into blind-index keys here, never plaintext rows).
 *
 * - `keys`: exact-match keys (tokens, references, uris, composites, presence), held in one
 *   GIN-indexed array on the resource row so several exact criteria intersect in one index scan.
 * - `strings`: string values for prefix, `:exact` and `:contains` matching (and `:text` of tokens).
 * - `dates`: ranges [lo, hi) at the value's precision.
 * - `numbers`: numbers and quantities (with system, code and unit for quantities).
 */
export interface SearchIndex {
  keys: string[];
  strings: IndexString[];
  dates: IndexDate[];
  numbers: IndexNumber[];
}
export interface IndexString {
  code: string;
  norm: string;
  exact: string;
}
export interface IndexDate {
  code: string;
  lo: string;
  hi: string;
  /** Composite token$date: the token part (`system|code` or `*|code`). */
  comp?: string;
}
export interface IndexNumber {
  code: string;
  num: string;
  system?: string;
  unit?: string;
  /** Quantity code (UCUM or other), matched together with `unit`. */
  qcode?: string;
  comp?: string;
}

/** Keys longer than this are stored as a digest (GIN entries have a size limit). */
const MAX_KEY = 512;
/** Strings longer than this are cut for the index (btree entries have a size limit). */
const MAX_STRING = 1024;

/** The exact-match key of a parameter value; search builds keys with the same function. */
export function indexKey(code: string, value: string): string {
  const key = `${code}=${value}`;
  return key.length <= MAX_KEY ? key : `${code}=#${createHash('sha256').update(value).digest('base64url')}`;
}
/** The key that says a parameter has at least one value (`:missing`). */
export function presenceKey(code: string): string {
  return `${code}?`;
}

type Token = { system?: string; code?: string; display?: string[] };

function str(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

/** Tokens of one typed value: Coding, CodeableConcept, Identifier, ContactPoint, primitives. */
function tokensOf(tv: TypedValue): Token[] {
  const v = tv.value as Record<string, unknown> | string | number | boolean | null | undefined;
  if (v === null || v === undefined) return [];
  if (typeof v !== 'object') return [{ code: String(v) }];
  switch (tv.type) {
    case 'CodeableConcept': {
      const codings = Array.isArray(v.coding) ? (v.coding as Record<string, unknown>[]) : [];
      const out: Token[] = codings.map((c) => ({
        system: str(c.system),
        code: str(c.code),
        display: [str(c.display), str(v.text)].filter((x): x is string => !!x),
      }));
      if (out.length === 0 && str(v.text)) out.push({ display: [v.text as string] });
      return out;
    }
    case 'Coding':
      return [
        { system: str(v.system), code: str(v.code), display: str(v.display) ? [v.display as string] : [] },
      ];
    case 'Identifier':
      return [
        {
          system: str(v.system),
          code: str(v.value),
          display: str((v.type as Record<string, unknown> | undefined)?.text)
            ? [(v.type as Record<string, string>).text!]
            : [],
        },
      ];
    case 'ContactPoint':
      return [{ system: str(v.system), code: str(v.value) }];
    default:
      return [];
  }
}

/** The key variants under which a token is found: `system|code`, `|code` (no system), `*|code`, `system|`. */
function tokenKeys(t: Token): string[] {
  const out: string[] = [];
  if (t.code !== undefined) {
    out.push(`${t.system ?? ''}|${t.code}`);
    out.push(`*|${t.code}`);
  }
  if (t.system !== undefined) out.push(`${t.system}|*`);
  return out;
}

function stringsOf(tv: TypedValue): string[] {
  const v = tv.value as Record<string, unknown> | string | undefined;
  if (typeof v === 'string') return [v];
  if (!v || typeof v !== 'object') return [];
  const parts: unknown[] = [];
  if (tv.type === 'HumanName') parts.push(v.text, v.family, v.given, v.prefix, v.suffix);
  else if (tv.type === 'Address')
    parts.push(v.text, v.line, v.city, v.district, v.state, v.postalCode, v.country);
  else parts.push(v.text, v.display);
  return parts.flat().filter((x): x is string => typeof x === 'string' && x.trim() !== '');
}

function rangesOf(tv: TypedValue): InstantRange[] {
  const v = tv.value as Record<string, unknown> | string | undefined;
  try {
    if (typeof v === 'string') return [dateRange(v)];
    if (!v || typeof v !== 'object') return [];
    if (tv.type === 'Period') {
      const r = periodRange(str(v.start), str(v.end));
      return r ? [r] : [];
    }
    if (tv.type === 'Timing') {
      // A Timing's bounds: from its earliest event (or bounds start) to its latest event (or bounds end).
      const events = (Array.isArray(v.event) ? v.event : []).filter(
        (e): e is string => typeof e === 'string',
      );
      const bounds = (v.repeat as Record<string, unknown> | undefined)?.boundsPeriod as
        Record<string, unknown> | undefined;
      const ranges = events.map(dateRange);
      if (bounds) {
        const r = periodRange(str(bounds.start), str(bounds.end));
        if (r) ranges.push(r);
      }
      if (ranges.length === 0) return [];
      const lo = ranges.map((r) => r.lo).sort()[0]!;
      const hi = ranges
        .map((r) => r.hi)
        .sort((a, b) => (a === 'infinity' ? 1 : b === 'infinity' ? -1 : a < b ? -1 : 1));
      return [{ lo, hi: hi[hi.length - 1]! }];
    }
  } catch {
    // Stored data passed validation; a value the range parser still rejects is left unindexed.
  }
  return [];
}

const QUANTITY_TYPES = new Set([
  'Quantity',
  'Age',
  'Duration',
  'Count',
  'Distance',
  'SimpleQuantity',
  'MoneyQuantity',
]);

function numbersOf(tv: TypedValue): Omit<IndexNumber, 'code'>[] {
  const v = tv.value as Record<string, unknown> | number | undefined;
  if (typeof v === 'number') return [{ num: String(v) }];
  if (!v || typeof v !== 'object' || typeof v.value !== 'number') return [];
  if (tv.type === 'Money')
    return [{ num: String(v.value), system: 'urn:iso:std:iso:4217', qcode: str(v.currency) }];
  if (!QUANTITY_TYPES.has(tv.type)) return [];
  return [{ num: String(v.value), system: str(v.system), qcode: str(v.code), unit: str(v.unit) }];
}

/** A reference's searchable form: `Type/id` (version and our own base URL removed), or the URL. */
export function normalizeReference(ref: string, baseUrl?: string): string {
  let r = ref;
  if (baseUrl && r.startsWith(`${baseUrl}/`)) r = r.slice(baseUrl.length + 1);
  const m = /^([A-Za-z]+\/[A-Za-z0-9\-.]{1,64})\/_history\/[A-Za-z0-9\-.]{1,64}$/.exec(r);
  if (m) return m[1]!;
  return r;
}

function eval_(param: { atom: SearchParam['atom'] }, input: TypedValue[]): TypedValue[] {
  try {
    return evalFhirPathTyped(param.atom, input);
  } catch {
    return [];
  }
}

/**
 * Extracts the search index of a resource: every search parameter of its type, by its official
 * FHIRPath expression. `baseUrl` lets absolute references to this server index as relative ones.
 */
export function extractSearchIndex(resource: Record<string, unknown>, baseUrl?: string): SearchIndex {
  const type = resource.resourceType as string;
  const keys = new Set<string>();
  const strings: IndexString[] = [];
  const dates: IndexDate[] = [];
  const numbers: IndexNumber[] = [];
  const input: TypedValue[] = [{ type, value: resource }];
  const addString = (code: string, s: string) => {
    const exact = s.slice(0, MAX_STRING);
    strings.push({ code, norm: normalizeString(exact), exact });
  };
  for (const param of searchParameters().indexed(type).values()) {
    const values = eval_(param, input);
    if (values.length === 0) continue;
    const before = keys.size + strings.length + dates.length + numbers.length;
    const { code } = param;
    for (const tv of values) {
      switch (param.type) {
        case 'token': {
          const tokens = tokensOf(tv);
          for (const t of tokens) {
            for (const k of tokenKeys(t)) keys.add(indexKey(code, k));
            for (const d of t.display ?? []) addString(`${code}:text`, d);
          }
          if (tv.type === 'Identifier') {
            const typeCodings = ((tv.value as Record<string, Record<string, unknown>>).type?.coding ??
              []) as Record<string, unknown>[];
            const value = str((tv.value as Record<string, unknown>).value);
            for (const c of typeCodings)
              if (value)
                keys.add(indexKey(`${code}:of-type`, `${str(c.system) ?? ''}|${str(c.code) ?? ''}|${value}`));
          }
          break;
        }
        case 'string':
          for (const s of stringsOf(tv)) addString(code, s);
          break;
        case 'uri':
          if (typeof tv.value === 'string') {
            keys.add(indexKey(code, tv.value));
            strings.push({ code, norm: tv.value.slice(0, MAX_STRING), exact: tv.value.slice(0, MAX_STRING) });
          }
          break;
        case 'date':
          for (const r of rangesOf(tv)) dates.push({ code, ...r });
          break;
        case 'number':
        case 'quantity':
          for (const n of numbersOf(tv)) numbers.push({ code, ...n });
          break;
        case 'reference': {
          const v = tv.value as Record<string, unknown> | string | undefined;
          if (typeof v === 'string') {
            // canonical: the URL, and the URL without its |version
            keys.add(indexKey(code, v));
            const bar = v.indexOf('|');
            if (bar > 0) keys.add(indexKey(code, v.slice(0, bar)));
          } else if (v && typeof v === 'object') {
            const ref = str(v.reference);
            if (ref && !ref.startsWith('#')) keys.add(indexKey(code, normalizeReference(ref, baseUrl)));
            const ident = v.identifier as Record<string, unknown> | undefined;
            if (ident)
              for (const k of tokenKeys({ system: str(ident.system), code: str(ident.value) }))
                keys.add(indexKey(`${code}:identifier`, k));
          }
          break;
        }
        case 'composite':
          extractComposite(param, tv, keys, dates, numbers);
          break;
      }
    }
    if (keys.size + strings.length + dates.length + numbers.length > before) keys.add(presenceKey(code));
  }
  return { keys: [...keys], strings, dates, numbers };
}

/** Composite values: the token part combined with each value of the second component. */
function extractComposite(
  param: SearchParam,
  tv: TypedValue,
  keys: Set<string>,
  dates: IndexDate[],
  numbers: IndexNumber[],
): void {
  const [first, second] = param.components!;
  const firstKeys = eval_(first!, [tv])
    .flatMap(tokensOf)
    .flatMap(tokenKeys)
    .filter((k) => !k.endsWith('|*'));
  if (firstKeys.length === 0) return;
  const seconds = eval_(second!, [tv]);
  for (const comp of firstKeys) {
    for (const sv of seconds) {
      if (second!.param.type === 'token') {
        for (const k of tokensOf(sv).flatMap(tokenKeys))
          if (!k.endsWith('|*')) keys.add(indexKey(param.code, `${comp}$${k}`));
      } else if (second!.param.type === 'quantity') {
        for (const n of numbersOf(sv)) numbers.push({ code: param.code, comp, ...n });
      } else {
        for (const r of rangesOf(sv)) dates.push({ code: param.code, comp, ...r });
      }
    }
  }
}
