import { randomUUID } from 'node:crypto';

/** FHIR R4 id: https://hl7.org/fhir/R4/datatypes.html#id */
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;

export function isFhirId(s: string): boolean {
  return FHIR_ID.test(s);
}

export function newId(): string {
  return randomUUID();
}
