import type { Config } from '../config/config.ts';
import type { Logger } from '../log/logger.ts';
import type { CustosCore } from '../server.ts';
import { PhiGateway } from '../phi/gateway.ts';
import { validateResource } from '../fhir/validator.ts';
import { isResourceType, RESOURCE_TYPES } from '../fhir/resource-types.ts';
import { SubscriptionWorker, type SubscriptionWorkerOptions } from './subscription-worker.ts';

/**
 * Starts the rest-hook subscription worker of a serving process (server.ts `startServer`): a PHI
 * gateway of its own over the same database, audit log and encryption as the HTTP one, the egress
 * gateway and the vendor registry of the core. Stop it (`stop()`) before the core closes.
 */
export function startSubscriptionWorker(
  config: Config,
  log: Logger,
  core: Pick<CustosCore, 'resourceDb' | 'audit' | 'encryption' | 'egress' | 'vendors'>,
  options: Partial<SubscriptionWorkerOptions> = {},
): SubscriptionWorker {
  const fhirBaseUrl = `${config.publicUrl}/fhir/R4`;
  const gateway = new PhiGateway({
    db: core.resourceDb,
    audit: core.audit,
    log,
    validate: validateResource,
    isResourceType,
    resourceTypes: RESOURCE_TYPES,
    fhirBaseUrl,
    searchTimeoutMs: 10_000,
    searchIndexing: config.searchIndexing,
    encryption: core.encryption,
  });
  const worker = new SubscriptionWorker(
    {
      db: core.resourceDb,
      gateway,
      egress: core.egress,
      vendors: core.vendors,
      isResourceType,
      fhirBaseUrl,
      log,
    },
    options,
  );
  worker.start();
  return worker;
}
