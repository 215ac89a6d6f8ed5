/**
 * SMART on FHIR scopes, v1 and v2 syntax, reduced to what the resource server decides on:
 * a context, a resource type and the five interactions create, read, update, delete, search.
 *
 * - v2: https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html#scopes-for-requesting-fhir-resources
 *   `system/Observation.rs`: the letters are a subset of `cruds`, in that order, each at most once.
 * - v1 (still accepted by servers): `read` = r+s, `write` = c+u+d, `*` = all five
 *   (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html#scopes-for-requesting-clinical-data).
 *
 * Not supported yet: v2 granular scopes with a query (`patient/Observation.rs?category=laboratory`)
 * parse as null, so they are never granted rather than granted too broadly.
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
}

const SCOPE = /^(system|patient|user)\/(\*|[A-Z][A-Za-z]{0,63})\.(\*|read|write|c?r?u?d?s?)$/;
const INTERACTIONS: readonly SmartInteraction[] = ['c', 'r', 'u', 'd', 's'];

/**
 * Parses one SMART scope; returns null for anything that is not a resource scope we support
 * (`openid`, `launch/patient`, typos, granular `?` scopes). Never throws: a token or a request
 * may carry scopes meant for someone else.
 *
 * @example parseSmartScope('system/Observation.rs') // { context: 'system', resourceType: 'Observation', r: true, s: true, c/u/d: false }
 */
export function parseSmartScope(scope: string): SmartScope | null {
  const m = SCOPE.exec(scope);
  if (!m || !m[3]) return null;
  const context = m[1] as SmartContext;
  const resourceType = m[2]!;
  const perm = m[3];
  const all = perm === '*';
  const has = (letter: SmartInteraction): boolean =>
    all ||
    (perm === 'read' && (letter === 'r' || letter === 's')) ||
    (perm === 'write' && (letter === 'c' || letter === 'u' || letter === 'd')) ||
    (perm !== 'read' && perm !== 'write' && perm.includes(letter));
  return { context, resourceType, c: has('c'), r: has('r'), u: has('u'), d: has('d'), s: has('s') };
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
 * apply, so they count only when asked for explicitly.
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
      p.context === context &&
      (p.resourceType === '*' || p.resourceType === resourceType) &&
      p[interaction]
    );
  });
}

/**
 * Whether the `granted` scopes cover every permission of `requested` (same context; a `*` grant
 * covers any type, a typed grant covers only its type). The authorization server uses it to grant a
 * requested scope narrower than the registered ones, e.g. `system/Patient.rs` under `system/*.cruds`.
 */
export function covers(granted: readonly SmartScope[], requested: SmartScope): boolean {
  return INTERACTIONS.every(
    (i) =>
      !requested[i] ||
      granted.some(
        (g) =>
          g.context === requested.context &&
          g[i] &&
          (g.resourceType === '*' || g.resourceType === requested.resourceType),
      ),
  );
}
