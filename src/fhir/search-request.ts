import { CustosError, type IssueDetail } from '../kernel/errors.ts';
import { searchParameters, type SearchParam } from './search-parameters.ts';
import { RESOURCE_TYPES } from './resource-types.ts';

/**
 * A parsed FHIR search (https://hl7.org/fhir/R4/search.html), independent of SQL. Values are kept
 * as written; the SQL compiler (src/store/search-sql.ts) parses them per parameter type and
 * reports malformed ones.
 */
export interface SearchRequest {
  /** The resource types searched (one for a type search; several for a system search). */
  types: string[];
  /** ANDed; each filter ORs its values. */
  filters: Filter[];
  count: number;
  sort: SortKey[];
  total: 'none' | 'estimate' | 'accurate' | undefined;
  summary: 'true' | 'text' | 'data' | 'count' | 'false' | undefined;
  elements: string[] | undefined;
  include: Include[];
  revinclude: Include[];
  cursor: string | undefined;
  /** Parameters ignored (lenient handling), reported in the Bundle's OperationOutcome. */
  ignored: IssueDetail[];
}

/** `_id` and `_lastUpdated` live in the resource row; everything else in the index. */
export type ColumnParam = { code: '_id' | '_lastUpdated'; type: 'token' | 'date' };

export type Filter =
  | {
      kind: 'param';
      resourceType: string;
      param: SearchParam | ColumnParam;
      modifier?: string;
      values: string[];
    }
  | { kind: 'chain'; resourceType: string; param: SearchParam; targets: string[]; inner: Filter }
  | { kind: 'has'; resourceType: string; source: string; refParam: SearchParam; inner: Filter };

export interface SortKey {
  param: SearchParam | ColumnParam;
  desc: boolean;
}
export interface Include {
  source: string;
  param: SearchParam;
  target?: string;
  iterate: boolean;
}

/** Limits that keep user input from turning into unbounded work (documented in docs/search.md). */
export const SEARCH_LIMITS = {
  defaultCount: 20,
  maxCount: 1000,
  maxValuesPerParam: 100,
  maxParams: 50,
  /** A chain or _has may match at most this many resources before the search is refused. */
  maxChainMatches: 1000,
  /** Included resources per page. */
  maxIncludes: 1000,
  maxIterateDepth: 3,
  maxHasDepth: 2,
} as const;

const CONTROL = new Set([
  '_count',
  '_sort',
  '_total',
  '_summary',
  '_elements',
  '_include',
  '_revinclude',
  '_cursor',
  '_format',
  '_pretty',
  '_type',
]);

const COLUMN: Record<string, ColumnParam> = {
  _id: { code: '_id', type: 'token' },
  _lastUpdated: { code: '_lastUpdated', type: 'date' },
};

/** Modifiers each parameter type accepts here (others are refused with a named issue). */
const MODIFIERS: Record<string, readonly string[]> = {
  string: ['exact', 'contains', 'missing'],
  token: ['not', 'text', 'of-type', 'missing'],
  date: ['missing'],
  number: ['missing'],
  quantity: ['missing'],
  reference: ['identifier', 'missing'],
  uri: ['below', 'above', 'missing'],
  composite: ['missing'],
};

/**
 * How a parameter name appears in an error. Names are shown (the issue asks that unknown ones be
 * named) only when they look like a search parameter name; anything else could be data pasted into
 * the wrong place, and errors never echo data.
 */
export function shownName(name: string): string {
  return /^[A-Za-z_][A-Za-z0-9_\-.:]{0,79}$/.test(name) ? name : '(a parameter whose name is not shown)';
}

function issue(diagnostics: string, code = 'invalid'): IssueDetail {
  return { severity: 'error', code, diagnostics };
}

function findParam(type: string, code: string): SearchParam | ColumnParam | undefined {
  return COLUMN[code] ?? searchParameters().get(type, code);
}

export interface ParseOptions {
  /** `Prefer: handling=strict`: unknown parameters are an error, not a warning. */
  strict: boolean;
}

/**
 * Parses a search's query parameters for `types`. Throws SEARCH_INVALID (or, in strict mode,
 * SEARCH_UNKNOWN_PARAMETER) naming every problem; never echoes a value (it could be PHI).
 */
export function parseSearch(types: string[], query: URLSearchParams, opts: ParseOptions): SearchRequest {
  const errors: IssueDetail[] = [];
  const ignored: IssueDetail[] = [];
  const req: SearchRequest = {
    types,
    filters: [],
    count: SEARCH_LIMITS.defaultCount,
    sort: [],
    total: undefined,
    summary: undefined,
    elements: undefined,
    include: [],
    revinclude: [],
    cursor: undefined,
    ignored,
  };
  const unknown = (name: string, why: string) => {
    const d = issue(`Parameter '${shownName(name)}' ${why}.`, 'not-supported');
    if (opts.strict) errors.push(d);
    else ignored.push({ ...d, severity: 'warning' });
  };
  let n = 0;
  for (const [rawName, value] of query) {
    if (++n > SEARCH_LIMITS.maxParams) {
      throw new CustosError('SEARCH_TOO_COSTLY', [issue(`More than ${SEARCH_LIMITS.maxParams} parameters.`)]);
    }
    const name = rawName.trim();
    if (/^_(rev)?include:(iterate|recurse)$/.test(name)) {
      const reverse = name.startsWith('_rev');
      const inc = parseInclude(types, name, value, errors, reverse);
      if (inc) (reverse ? req.revinclude : req.include).push(inc);
      continue;
    }
    if (CONTROL.has(name)) {
      parseControl(req, name, value, errors, unknown);
      continue;
    }
    if (name.startsWith('_has:')) {
      const f = parseHas(types, name, value, errors, 0);
      if (f) req.filters.push(f);
      continue;
    }
    const filter = parseFilterFor(types, name, value, errors, unknown);
    if (filter) req.filters.push(filter);
  }
  if (errors.length > 0) {
    const unsupported = errors.every((e) => e.code === 'not-supported');
    throw new CustosError(unsupported ? 'SEARCH_UNKNOWN_PARAMETER' : 'SEARCH_INVALID', errors);
  }
  return req;
}

function splitValues(name: string, value: string, errors: IssueDetail[]): string[] {
  // A comma separates OR'd values; `\,` is a literal comma (R4 §3.1.1.4.1 escaping).
  const values: string[] = [];
  let cur = '';
  for (let i = 0; i < value.length; i++) {
    const ch = value[i]!;
    if (ch === '\\' && i + 1 < value.length && ',$|\\'.includes(value[i + 1]!)) {
      cur += ch + value[++i];
    } else if (ch === ',') {
      values.push(cur);
      cur = '';
    } else cur += ch;
  }
  values.push(cur);
  if (values.length > SEARCH_LIMITS.maxValuesPerParam)
    errors.push(
      issue(
        `Parameter '${shownName(name)}' has more than ${SEARCH_LIMITS.maxValuesPerParam} values.`,
        'too-costly',
      ),
    );
  if (values.some((v) => v === '')) errors.push(issue(`Parameter '${shownName(name)}' has an empty value.`));
  return values;
}

/** One filter for a parameter name (with modifier or chain) on the searched types. */
function parseFilterFor(
  types: string[],
  name: string,
  value: string,
  errors: IssueDetail[],
  unknown: (name: string, why: string) => void,
): Filter | undefined {
  const dot = name.indexOf('.');
  if (dot > 0) return parseChain(types, name, dot, value, errors, unknown);
  const colon = name.indexOf(':');
  const code = colon < 0 ? name : name.slice(0, colon);
  const modifier = colon < 0 ? undefined : name.slice(colon + 1);
  // A system search (several types) supports only the parameters common to all of them.
  const params = types.map((t) => findParam(t, code));
  const param = params[0];
  if (!param || params.some((p) => !p || p.type !== param.type)) {
    unknown(
      name,
      types.length === 1 ? `is not a search parameter of ${types[0]}` : 'is not common to the searched types',
    );
    return undefined;
  }
  const mod = modifier;
  if (mod !== undefined && param.type === 'reference' && RESOURCE_TYPES.has(mod)) {
    // `subject:Patient=123`: a type modifier narrows the reference to that type.
    const targets = (param as SearchParam).targets;
    if (targets.length > 0 && !targets.includes(mod)) {
      errors.push(
        issue(
          `Parameter '${shownName(name)}': ${shownName(mod)} is not a target type of '${shownName(code)}'.`,
        ),
      );
      return undefined;
    }
    return {
      kind: 'param',
      resourceType: types[0]!,
      param,
      modifier: `type:${mod}`,
      values: splitValues(name, value, errors),
    };
  }
  if (mod !== undefined && !(MODIFIERS[param.type] ?? []).includes(mod)) {
    unknown(name, `uses modifier ':${shownName(mod)}', which is not supported for ${param.type} parameters`);
    return undefined;
  }
  if (mod === 'missing' && value !== 'true' && value !== 'false') {
    errors.push(issue(`Parameter '${shownName(name)}' must be true or false.`));
    return undefined;
  }
  if (mod !== undefined && (param.code === '_id' || param.code === '_lastUpdated')) {
    unknown(name, `uses a modifier, which ${param.code} does not take`);
    return undefined;
  }
  return {
    kind: 'param',
    resourceType: types[0]!,
    param,
    modifier: mod,
    values: splitValues(name, value, errors),
  };
}

/** `subject:Patient.name=x` or `subject.name=x`: one level of chaining. */
function parseChain(
  types: string[],
  name: string,
  dot: number,
  value: string,
  errors: IssueDetail[],
  unknown: (name: string, why: string) => void,
): Filter | undefined {
  if (types.length !== 1) {
    unknown(name, 'chains, which need a single resource type');
    return undefined;
  }
  const type = types[0]!;
  const head = name.slice(0, dot);
  const rest = name.slice(dot + 1);
  const [code, typeMod] = head.split(':') as [string, string | undefined];
  const param = searchParameters().get(type, code);
  if (!param || param.type !== 'reference') {
    unknown(name, `chains through '${shownName(code)}', which is not a reference parameter of ${type}`);
    return undefined;
  }
  if (rest.includes('.')) {
    errors.push(
      issue(`Parameter '${shownName(name)}' chains more than one level (the limit here).`, 'too-costly'),
    );
    return undefined;
  }
  let targets = typeMod ? [typeMod] : [...param.targets];
  if (typeMod && !param.targets.includes(typeMod)) {
    errors.push(
      issue(
        `Parameter '${shownName(name)}': ${shownName(typeMod)} is not a target type of '${shownName(code)}'.`,
      ),
    );
    return undefined;
  }
  const innerCode = rest.split(':')[0]!;
  targets = targets.filter((t) => findParam(t, innerCode));
  if (targets.length === 0) {
    unknown(name, `chains to '${shownName(innerCode)}', which no target type of '${shownName(code)}' has`);
    return undefined;
  }
  const inner = parseFilterFor(targets.slice(0, 1), rest, value, errors, unknown);
  if (!inner) return undefined;
  return { kind: 'chain', resourceType: type, param, targets, inner };
}

/** `_has:Observation:patient:code=1234-5` (reverse chaining), nested at most maxHasDepth. */
function parseHas(
  types: string[],
  name: string,
  value: string,
  errors: IssueDetail[],
  depth: number,
): Filter | undefined {
  const m = /^_has:([A-Za-z]+):([A-Za-z0-9\-_]+):(.+)$/.exec(name);
  if (!m || types.length !== 1) {
    errors.push(issue(`Parameter '${shownName(name)}' is not of the form _has:Type:reference:parameter.`));
    return undefined;
  }
  if (depth >= SEARCH_LIMITS.maxHasDepth) {
    errors.push(
      issue(
        `Parameter '${shownName(name)}' nests _has more than ${SEARCH_LIMITS.maxHasDepth} deep.`,
        'too-costly',
      ),
    );
    return undefined;
  }
  const [, source, refCode, rest] = m as unknown as [string, string, string, string];
  if (!RESOURCE_TYPES.has(source)) {
    errors.push(issue(`Parameter '${shownName(name)}': ${shownName(source)} is not a resource type.`));
    return undefined;
  }
  const refParam = searchParameters().get(source, refCode);
  if (
    !refParam ||
    refParam.type !== 'reference' ||
    (refParam.targets.length > 0 && !refParam.targets.includes(types[0]!))
  ) {
    errors.push(
      issue(
        `Parameter '${shownName(name)}': '${shownName(refCode)}' is not a reference from ${shownName(source)} to ${types[0]}.`,
      ),
    );
    return undefined;
  }
  const inner = rest.startsWith('_has:')
    ? parseHas([source], rest, value, errors, depth + 1)
    : parseFilterFor([source], rest, value, errors, (n, why) =>
        errors.push(issue(`Parameter '${shownName(name)}': '${n}' ${why}.`, 'not-supported')),
      );
  if (!inner) return undefined;
  return { kind: 'has', resourceType: types[0]!, source, refParam, inner };
}

function parseInclude(
  types: string[],
  name: string,
  value: string,
  errors: IssueDetail[],
  reverse: boolean,
): Include | undefined {
  const iterate = name.endsWith(':iterate') || name.endsWith(':recurse');
  const [source, code, target] = value.split(':') as [string, string | undefined, string | undefined];
  if (value === '*') {
    errors.push(
      issue(`Parameter '${shownName(name)}=*' is not supported; name the parameter.`, 'not-supported'),
    );
    return undefined;
  }
  const param = code ? searchParameters().get(source, code) : undefined;
  if (!RESOURCE_TYPES.has(source) || !param || param.type !== 'reference') {
    errors.push(issue(`Parameter '${shownName(name)}' must name Type:referenceParameter[:TargetType].`));
    return undefined;
  }
  if (
    target !== undefined &&
    (!RESOURCE_TYPES.has(target) || (param.targets.length > 0 && !param.targets.includes(target)))
  ) {
    errors.push(
      issue(
        `Parameter '${shownName(name)}': ${shownName(target)} is not a target of ${shownName(source)}:${shownName(code ?? '')}.`,
      ),
    );
    return undefined;
  }
  if (!reverse && !iterate && !types.includes(source)) {
    errors.push(
      issue(
        `Parameter '${shownName(name)}': ${shownName(source)} is not a searched type (use :iterate for included ones).`,
      ),
    );
    return undefined;
  }
  return { source, param, target, iterate };
}

function parseControl(
  req: SearchRequest,
  name: string,
  value: string,
  errors: IssueDetail[],
  unknown: (name: string, why: string) => void,
): void {
  switch (name) {
    case '_count': {
      if (!/^\d{1,9}$/.test(value)) {
        errors.push(issue(`Parameter '_count' must be a non-negative integer.`));
        return;
      }
      const n = Number(value);
      if (n > SEARCH_LIMITS.maxCount) {
        req.ignored.push({
          severity: 'warning',
          code: 'too-costly',
          diagnostics: `_count is limited to ${SEARCH_LIMITS.maxCount}; pages hold at most that many.`,
        });
      }
      req.count = Math.min(n, SEARCH_LIMITS.maxCount);
      return;
    }
    case '_sort':
      for (const raw of value.split(',')) {
        const desc = raw.startsWith('-');
        const code = desc ? raw.slice(1) : raw;
        const params = req.types.map((t) => findParam(t, code));
        const param = params[0];
        if (!param || params.some((p) => !p) || param.type === 'composite') {
          errors.push(
            issue(
              `_sort names '${shownName(code)}', which is not a sortable parameter of the searched type.`,
            ),
          );
          continue;
        }
        req.sort.push({ param, desc });
      }
      return;
    case '_total':
      if (value !== 'none' && value !== 'estimate' && value !== 'accurate')
        errors.push(issue(`_total must be none, estimate or accurate.`));
      else req.total = value;
      return;
    case '_summary':
      if (!['true', 'text', 'data', 'count', 'false'].includes(value))
        errors.push(issue(`_summary must be true, text, data, count or false.`));
      else req.summary = value as SearchRequest['summary'];
      return;
    case '_elements':
      req.elements = value
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean);
      return;
    case '_include':
    case '_revinclude': {
      const inc = parseInclude(req.types, name, value, errors, name === '_revinclude');
      if (inc) (name === '_include' ? req.include : req.revinclude).push(inc);
      return;
    }
    case '_cursor':
      req.cursor = value;
      return;
    case '_type':
      // Handled by the caller (system search picks the types); ignored on a type search.
      return;
    default:
      // _format and _pretty: JSON is the only format; output is compact.
      if (name !== '_format' && name !== '_pretty') unknown(name, 'is not supported');
  }
}
