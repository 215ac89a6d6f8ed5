import { searchParameters } from '../fhir/search-parameters.ts';
import { ALL_CLASSES, type PolicyRule, type SensitivityClass } from '../crypto/protection-policy.ts';

/**
 * Which sensitivity classes a purpose of use reveals (minimum necessary, 45 CFR 164.502(b)),
 * until the access issue (6) adds per-role policies that narrow this further. Classes not
 * revealed come back as data-absent-reason "masked" placeholders with the MASKED label.
 *
 * - treatment, care management, patient safety, the patient's own request, emergency access and
 *   test data: everything;
 * - payment and coverage: identifiers, diagnoses (claims carry them) and contact details;
 * - operations, quality and accreditation: diagnoses only;
 * - anything else (research, marketing, legal, public health, …): nothing protected.
 */
const BY_PURPOSE: Record<string, readonly SensitivityClass[]> = {};
for (const p of ['TREAT', 'ETREAT', 'CAREMGT', 'PATSFTY', 'PATRQT', 'FAMRQT', 'PWATRNY', 'HTEST'])
  BY_PURPOSE[p] = ALL_CLASSES;
for (const p of ['HPAYMT', 'CLMATTCH', 'COVAUTH', 'COVERAGE', 'ELIGDTRM', 'ELIGVER', 'ENROLLM', 'REMITADV'])
  BY_PURPOSE[p] = ['identifiers', 'diagnoses', 'contact'];
for (const p of ['HOPERAT', 'HQUALIMP', 'HOUTCOMS', 'PERFMSR', 'HACCRED', 'HCOMPL', 'RECORDMGT'])
  BY_PURPOSE[p] = ['diagnoses'];

export function visibleClasses(purpose: string | undefined): ReadonlySet<string> {
  return new Set(purpose ? (BY_PURPOSE[purpose] ?? []) : []);
}

/**
 * The search parameters that may hold protected values, per type, with the class: a parameter
 * whose expression reaches an element a rule protects (`Patient.identifier`, `Condition.code`,
 * `Observation.value`). Exact token searches on them also match blind-index keys; searches that
 * would need plaintext (`:text`, `:contains`, prefixes) are refused on them.
 */
export class ProtectedParams {
  private readonly map = new Map<string, SensitivityClass>();
  constructor(policy: readonly PolicyRule[]) {
    for (const rule of policy) {
      const head = rule.path.split('.')[0]!.replace('[x]', '');
      // Narrative and Annotation text are not reached by any search parameter except _text/_content.
      if (head === 'text' || rule.path.endsWith('.text')) continue;
      const needle = new RegExp(`(^|[^A-Za-z])${rule.type}\\.${head}(?![A-Za-z])`);
      for (const p of searchParameters().indexed(rule.type).values()) {
        if (needle.test(p.expression)) this.map.set(`${rule.type}.${p.code}`, rule.class);
      }
    }
  }
  classOf(type: string, code: string): SensitivityClass | undefined {
    return this.map.get(`${type}.${code}`);
  }
}

/** `protectedClassOf` for the policy administration (access-policy.ts), when field encryption is on. */
export function protectedCriteria(core: { encryption?: { policy: readonly PolicyRule[] } }): {
  protectedClassOf?: (type: string, code: string) => string | undefined;
} {
  if (!core.encryption) return {};
  const params = new ProtectedParams(core.encryption.policy);
  return { protectedClassOf: (type, code) => params.classOf(type, code) };
}
