import fs from 'node:fs';
import type { Command } from 'commander';
import { documentSha256 } from '../admin/project-baa.ts';
import {
  DATA_CLASSES,
  ENDPOINT_PROTOCOLS,
  BAA_WARNING_DAYS,
  type Vendor,
} from '../egress/vendor-registry.ts';
import { type CommandDeps, whoami } from './command-deps.ts';

/** The common command deps, and how main.ts splits a comma-separated list. */
export type VendorCommandDeps = CommandDeps & { list: (v: string) => string[] };

/** Human text of one vendor. */
export function vendorText(v: Vendor): string {
  const baa = v.baa
    ? v.baa.executed
      ? `BAA executed ${v.baa.executedAt}, expires ${v.baa.expiresOn} (${v.baaState}` +
        `${v.expiresInDays !== undefined ? `, ${v.expiresInDays > 0 ? `in ${v.expiresInDays} days` : 'EXPIRED: PHI blocked'}` : ''})` +
        `; document SHA-256 ${v.baa.documentSha256}`
      : 'BAA not executed: no PHI'
    : v.kind === 'vendor'
      ? 'no BAA: no PHI'
      : `${v.kind} (configured by ${v.configuredBy})`;
  const warn =
    v.baaState === 'expiring'
      ? `\n  WARNING: the BAA expires in ${v.expiresInDays} days (warned from ${BAA_WARNING_DAYS} days ahead)`
      : v.baaState === 'expired'
        ? '\n  WARNING: the BAA has expired: PHI to this vendor is blocked'
        : '';
  const eps = v.endpoints.map(
    (e) =>
      `  endpoint ${e.protocol}://${e.host.includes(':') ? `[${e.host}]` : e.host}:${e.port}${e.allowPrivate ? ' (private address allowed)' : ''}`,
  );
  return [
    `${v.name} (${v.vendorId}): may receive ${v.phiClass}; ${baa}${warn}`,
    ...(v.services.length ? [`  services ${v.services.join(', ')}`] : []),
    ...(eps.length ? eps : ['  no endpoint: nothing can be sent to it']),
  ].join('\n');
}

/** `custos vendor add|endpoint|baa|list|show`. */
export function vendorCommand(program: Command, d: VendorCommandDeps): void {
  const vendor = program
    .command('vendor')
    .description('The vendor registry: who may receive what, at which endpoints, under which BAA');
  vendor
    .command('add')
    .description('Register a vendor and the class of data it may receive (audited)')
    .requiredOption('--name <name>', 'the vendor, as administrators know it')
    .requiredOption('--phi-class <class>', `what it may receive: ${DATA_CLASSES.join(', ')}`)
    .option('--services <list>', 'what it does for us, comma-separated (e.g. webhooks,email)')
    .option('--json', 'print one JSON document')
    .action(async (opts: { name: string; phiClass: string; services?: string; json?: boolean }) => {
      const cfg = d.config();
      const req = {
        name: opts.name,
        phiClass: opts.phiClass,
        services: opts.services ? d.list(opts.services) : [],
        recordedBy: whoami(),
      };
      const r = await d.withBackend<Vendor>(
        cfg,
        async (call) => (await call('/admin/vendors', req)) as Vendor,
        (core) => core.vendors.addVendor(req),
      );
      d.print(opts.json === true, r, `Vendor registered:\n${vendorText(r)}`);
    });
  vendor
    .command('endpoint')
    .description('Add an endpoint (host, port, protocol) to a vendor (audited)')
    .requiredOption('--vendor <id|name>', 'the vendor')
    .requiredOption('--host <host>', 'DNS name or IP address')
    .requiredOption('--port <n>', 'TCP port')
    .option('--protocol <p>', `${ENDPOINT_PROTOCOLS.join(', ')} (http needs --allow-private)`, 'https')
    .option('--allow-private', 'allow private, loopback or link-local addresses for exactly this endpoint')
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        vendor: string;
        host: string;
        port: string;
        protocol: string;
        allowPrivate?: boolean;
        json?: boolean;
      }) => {
        if (!/^\d{1,5}$/.test(opts.port)) throw d.usage('custos: --port must be a number from 1 to 65535');
        const cfg = d.config();
        const req = {
          vendor: opts.vendor,
          host: opts.host,
          port: Number(opts.port),
          protocol: opts.protocol,
          allowPrivate: opts.allowPrivate === true,
          recordedBy: whoami(),
        };
        const r = await d.withBackend<Vendor>(
          cfg,
          async (call) => (await call('/admin/vendors/endpoints', req)) as Vendor,
          (core) => core.vendors.addEndpoint(req),
        );
        d.print(opts.json === true, r, `Endpoint added:\n${vendorText(r)}`);
      },
    );
  vendor
    .command('baa')
    .description("Record a vendor's Business Associate Agreement (audited); the newest one is in force")
    .requiredOption('--vendor <id|name>', 'the vendor')
    .option('--executed-at <date>', 'when it was signed (YYYY-MM-DD)')
    .option('--expires <date>', 'its expiry date (YYYY-MM-DD): PHI is blocked from that day on')
    .option('--document <file>', 'the signed document: its SHA-256 is recorded, the file is not stored')
    .option('--not-executed', 'record a BAA that is not (or no longer) executed: no PHI to this vendor')
    .option('--json', 'print one JSON document')
    .action(
      async (opts: {
        vendor: string;
        executedAt?: string;
        expires?: string;
        document?: string;
        notExecuted?: boolean;
        json?: boolean;
      }) => {
        let sha: string | undefined;
        if (opts.document !== undefined) {
          let bytes: Buffer;
          try {
            bytes = fs.readFileSync(opts.document);
          } catch {
            throw d.usage('custos: --document: cannot read that file; nothing was recorded');
          }
          if (bytes.length === 0)
            throw d.usage('custos: --document: the file is empty; nothing was recorded');
          sha = documentSha256(bytes);
        }
        const cfg = d.config();
        const req = {
          vendor: opts.vendor,
          executed: opts.notExecuted !== true,
          executedAt: opts.executedAt,
          expiresOn: opts.expires,
          documentSha256: sha,
          recordedBy: whoami(),
        };
        const r = await d.withBackend<Vendor>(
          cfg,
          async (call) => (await call('/admin/vendors/baa', req)) as Vendor,
          (core) => core.vendors.recordBaa(req),
        );
        d.print(opts.json === true, r, `BAA recorded:\n${vendorText(r)}`);
      },
    );
  vendor
    .command('list')
    .description('Every vendor and infrastructure destination, with BAA state and days to expiry')
    .option('--json', 'print one JSON document')
    .action(async (opts: { json?: boolean }) => {
      const cfg = d.config();
      const r = await d.withBackend<{ vendors: Vendor[] }>(
        cfg,
        async (call) => (await call('/admin/vendors/list', {})) as { vendors: Vendor[] },
        async (core) => ({ vendors: await core.vendors.list() }),
      );
      d.print(
        opts.json === true,
        r,
        r.vendors.length
          ? r.vendors.map(vendorText).join('\n')
          : 'No vendor: nothing may leave this installation.',
      );
    });
  vendor
    .command('show')
    .description('One vendor: endpoints, BAA, the class of data it may receive')
    .requiredOption('--vendor <id|name>', 'the vendor')
    .option('--json', 'print one JSON document')
    .action(async (opts: { vendor: string; json?: boolean }) => {
      const cfg = d.config();
      const r = await d.withBackend<Vendor>(
        cfg,
        async (call) => (await call('/admin/vendors/show', { vendor: opts.vendor })) as Vendor,
        (core) => core.vendors.show(opts.vendor),
      );
      d.print(opts.json === true, r, vendorText(r));
    });
}
