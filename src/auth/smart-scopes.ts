/**
 * SMART on FHIR scopes, v1 and v2 syntax, reduced to what the resource server decides on:
 * a context, a resource type and the five interactions create, read, update, delete, search.
 *
 * - v2: https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html#scopes-for-requesting-fhir-resources
 *   `system/Observation.rs`: the letters are a subset of `cruds`, in that order, each at most once.
 * - v1 (still accepted by servers): `read` = r+s, `write` = c+u+d, `*` = all five
 *   (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html#scopes-for-requesting-clinical-data).
 *
 * v2 granular scopes with a query (`patient/Observation.rs?category=laboratory`) keep the query in
 * `query`: such a scope grants its interactions only on resources matching the criteria. `allows`
 * and `covers` never read a restricted scope as an unrestricted one; the PHI gateway compiles the
 * criteria into its access predicate (src/phi/access-policy.ts, docs/access-policies.md).
 */
export type SmartContext = 'system' | 'patient' | 'user';
export type SmartInteraction = 'c' | 'r' | 'u' | 'd' | 's';

export interface SmartScope {
  readonly context: SmartContext;
  /** A FHIR resource type, or `*` for every type. */
  readonly resourceType: string;
  readonly c: boolean;
  readonly r: boolean;
  readonly u: boolean;
  readonly d: boolean;
  readonly s: boolean;
  /**
   * SMART v2 granular scope criteria (`category=laboratory`, without the `?`), or undefined for an
   * unrestricted scope.
   */
  readonly query?: string;
}

const SCOPE =
  /^(system|patient|user)\/(\*|[A-Z][A-Za-z]{0,63})\.(\*|read|write|c?r?u?d?s?)(?:\?([A-Za-z0-9_\-.:|=&%,$/+]{1,512}))?$/;
const INTERACTIONS: readonly SmartInteraction[] = ['c', 'r', 'u', 'd', 's'];

/**
 * Parses one SMART scope; returns null for anything that is not a resource scope we support
 * (`openid`, `launch/patient`, typos). A granular v2 scope keeps its criteria in `query`; a query
 * is only accepted on v2 permissions (`.rs?…`, not `.read?…`) and on a single resource type.
 * Never throws: a token or a request may carry scopes meant for someone else.
 *
 * @example parseSmartScope('system/Observation.rs') // { context: 'system', resourceType: 'Observation', r: true, s: true, c/u/d: false }
 */
export function parseSmartScope(scope: string): SmartScope | null {
  const m = SCOPE.exec(scope);
  if (!m || !m[3]) return null;
  const context = m[1] as SmartContext;
  const resourceType = m[2]!;
  const perm = m[3];
  const query = m[4];
  if (query !== undefined && (resourceType === '*' || perm === '*' || perm === 'read' || perm === 'write'))
    return null;
  const all = perm === '*';
  const has = (letter: SmartInteraction): boolean =>
    all ||
    (perm === 'read' && (letter === 'r' || letter === 's')) ||
    (perm === 'write' && (letter === 'c' || letter === 'u' || letter === 'd')) ||
    (perm !== 'read' && perm !== 'write' && perm.includes(letter));
  const parsed = { context, resourceType, c: has('c'), r: has('r'), u: has('u'), d: has('d'), s: has('s') };
  return query === undefined ? parsed : { ...parsed, query };
}

/** Parses a space-separated scope string (as in a token's `scope` claim), dropping what does not parse. */
export function parseSmartScopes(scopes: string | readonly string[]): SmartScope[] {
  const list = typeof scopes === 'string' ? scopes.split(' ') : scopes;
  return list.map(parseSmartScope).filter((s): s is SmartScope => s !== null);
}

/**
 * Whether `scopes` permit `interaction` on `resourceType` in `context`.
 *
 * `context` defaults to `system`: patient and user scopes need a further restriction (the patient
 * compartment, the user's own permissions) that only a caller aware of the launch context can
 * apply, so they count only when asked for explicitly. A granular scope (with `query`) never
 * counts here: it allows only what matches its criteria, which the gateway decides.
 *
 * @example allows(['system/*.rs'], 'Patient', 'r') // true
 */
export function allows(
  scopes: readonly (string | SmartScope)[],
  resourceType: string,
  interaction: SmartInteraction,
  context: SmartContext = 'system',
): boolean {
  return scopes.some((s) => {
    const p = typeof s === 'string' ? parseSmartScope(s) : s;
    return (
      p !== null &&
      p.query === undefined &&
      p.context === context &&
      (p.resourceType === '*' || p.resourceType === resourceType) &&
      p[interaction]
    );
  });
}

/**
 * Whether `scopes` permit `interaction` on `resourceType` in any context, granular scopes included:
 * the coarse check for a person's token, whose patient and user scopes the gateway then narrows
 * (launch patient, criteria, role policy).
 */
export function allowsAnyContext(
  scopes: readonly SmartScope[],
  resourceType: string,
  interaction: SmartInteraction,
): boolean {
  return scopes.some((p) => (p.resourceType === '*' || p.resourceType === resourceType) && p[interaction]);
}

/**
 * Whether the `granted` scopes cover every permission of `requested` (same context; a `*` grant
 * covers any type, a typed grant covers only its type; a granular grant covers only a request with
 * the same criteria). The authorization server uses it to grant a
 * requested scope narrower than the registered ones, e.g. `system/Patient.rs` under `system/*.cruds`.
 */
export function covers(granted: readonly SmartScope[], requested: SmartScope): boolean {
  return INTERACTIONS.every(
    (i) =>
      !requested[i] ||
      granted.some(
        (g) =>
          g.context === requested.context &&
          (g.query === undefined || g.query === requested.query) &&
          g[i] &&
          (g.resourceType === '*' || g.resourceType === requested.resourceType),
      ),
  );
}
