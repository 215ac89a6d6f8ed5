import type { Config } from '../config/config.ts';
import type { Logger } from '../log/logger.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { validateResource } from '../fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../fhir/resource-types.ts';
import { PhiGateway, type GatewayDeps } from './gateway.ts';

/** How long a search may run before it is cancelled (SEARCH_TIMEOUT), in a serving process. */
export const SERVING_SEARCH_TIMEOUT_MS = 10_000;

/**
 * The PHI gateway of a serving process over its resource database, audit log and encryption: the
 * one the HTTP routes use, and the subscription worker's own (the same configuration, so that a
 * notification is read exactly as a client's request would be).
 */
export function servingGateway(
  config: Pick<Config, 'publicUrl' | 'searchIndexing'>,
  log: Logger,
  core: { resourceDb: SqlDriver; audit: AuditLog; encryption: GatewayDeps['encryption'] },
): PhiGateway {
  return new PhiGateway({
    db: core.resourceDb,
    audit: core.audit,
    log,
    validate: validateResource,
    isResourceType,
    resourceTypes: RESOURCE_TYPES,
    fhirBaseUrl: `${config.publicUrl}/fhir/R4`,
    searchTimeoutMs: SERVING_SEARCH_TIMEOUT_MS,
    searchIndexing: config.searchIndexing,
    encryption: core.encryption,
  });
}
