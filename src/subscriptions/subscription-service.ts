import type { Config } from '../config/config.ts';
import type { Logger } from '../log/logger.ts';
import type { CustosCore } from '../server.ts';
import { servingGateway } from '../phi/serving-gateway.ts';
import { isResourceType } from '../fhir/resource-types.ts';
import { SmtpMailer } from '../egress/smtp-mailer.ts';
import type { EgressGateway } from '../egress/egress.ts';
import { certificates, readPem } from '../config/pem-files.ts';
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
  smtpCa?: Buffer,
): SubscriptionWorker {
  const fhirBaseUrl = `${config.publicUrl}/fhir/R4`;
  const gateway = servingGateway(config, log, core);
  const worker = new SubscriptionWorker(
    {
      db: core.resourceDb,
      gateway,
      egress: core.egress,
      vendors: core.vendors,
      isResourceType,
      fhirBaseUrl,
      log,
      mailer: config.smtp && smtpMailer(config.smtp, core.egress, smtpCa),
    },
    {
      maxAttempts: config.subscriptionDelivery.maxAttempts,
      retryMaxMs: config.subscriptionDelivery.retryMaxSeconds * 1000,
      requestTimeoutMs: config.subscriptionDelivery.timeoutSeconds * 1000,
      ...options,
    },
  );
  worker.start();
  return worker;
}

/** Reads CUSTOS_SMTP_CA_FILE: call before storage is opened, so that a bad file stops the start. */
export function loadSmtpCa(smtp: NonNullable<Config['smtp']>): Buffer | undefined {
  if (!smtp.caFile) return undefined;
  const ca = readPem('CUSTOS_SMTP_CA_FILE', smtp.caFile);
  certificates('CUSTOS_SMTP_CA_FILE', smtp.caFile, ca);
  return ca;
}

/** The SMTP relay of CUSTOS_SMTP_*, trusting `ca` (loadSmtpCa) when given. */
function smtpMailer(
  smtp: NonNullable<Config['smtp']>,
  egress: EgressGateway,
  ca: Buffer | undefined,
): SmtpMailer {
  return new SmtpMailer(egress, {
    host: smtp.host,
    port: smtp.port,
    from: smtp.from,
    user: smtp.user,
    password: smtp.password,
    ca,
    recipientDomains: smtp.recipientDomains,
  });
}
