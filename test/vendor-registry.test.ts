import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { PgliteDriver } from '../src/store/pglite/pglite-driver.ts';
import { PgDriver } from '../src/store/pg/pg-driver.ts';
import type { SqlDriver } from '../src/store/sql-driver.ts';
import { migrate, RESOURCE_MIGRATIONS } from '../src/store/migrations.ts';
import { prepareAuditSchema } from '../src/audit/audit-migrations.ts';
import { AuditLog } from '../src/audit/audit-log.ts';
import type { AuditEvent } from '../src/audit/audit-event.ts';
import { VendorRegistry, baaStateOf, type Vendor } from '../src/egress/vendor-registry.ts';
import { EgressGateway } from '../src/egress/egress.ts';
import { infrastructureVendors } from '../src/egress/infrastructure.ts';
import { isCustosError } from '../src/kernel/errors.ts';
import type { Logger, LogFields } from '../src/log/logger.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { runCustos } from './support/custos-cli.ts';

// The vendor registry (issue 7): vendors, endpoints, BAAs with expiry, every change audited; the
// gateway reads it. On embedded storage or, with CUSTOS_TEST_DATABASE_URL, a PostgreSQL server.

const SHA = 'a'.repeat(64);
const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10);

async function auditEvents(db: SqlDriver): Promise<AuditEvent[]> {
  const r = await db.query<{ entry: Uint8Array }>('SELECT entry FROM audit_entry ORDER BY seq');
  return r.rows.map((x) => JSON.parse(Buffer.from(x.entry).toString('utf8')) as AuditEvent);
}

function recordingLogger(): { log: Logger; events: { level: string; event: string; fields?: LogFields }[] } {
  const events: { level: string; event: string; fields?: LogFields }[] = [];
  const at = (level: string) => (event: string, fields?: LogFields) => events.push({ level, event, fields });
  return { log: { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') }, events };
}

describe('vendor registry', () => {
  let storage: TestStorage;
  let resourceDb: SqlDriver;
  let auditDb: SqlDriver;
  let audit: AuditLog;
  let registry: VendorRegistry;
  const logged = recordingLogger();

  before(async () => {
    storage = await createTestStorage();
    resourceDb = storage.databaseUrl
      ? await PgDriver.open(storage.databaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'resources'));
    auditDb = storage.auditDatabaseUrl
      ? await PgDriver.open(storage.auditDatabaseUrl)
      : await PgliteDriver.open(path.join(storage.dataDir, 'audit'));
    await migrate(resourceDb, RESOURCE_MIGRATIONS, 'custos_migration');
    await prepareAuditSchema(auditDb, { production: false });
    audit = new AuditLog(auditDb);
    registry = new VendorRegistry({
      db: resourceDb,
      audit,
      log: logged.log,
      infrastructure: infrastructureVendors({
        siem: { host: 'siem.example.test', port: 6514 },
        auditWitnesses: [{ url: 'https://witness.example.com/w' }],
        kms: { region: 'eu-west-1', endpoint: undefined },
      }),
    });
  });

  after(async () => {
    await resourceDb?.close();
    await auditDb?.close();
    await storage?.cleanup();
  });

  test('add a vendor, an endpoint and a BAA: each change audited as an admin action', async () => {
    const before = (await auditEvents(auditDb)).length;
    const v = await registry.addVendor({
      name: 'Example Notify',
      services: ['webhooks', 'Email'],
      phiClass: 'full',
      recordedBy: 'dana',
    });
    assert.equal(v.kind, 'vendor');
    assert.deepEqual(v.services, ['webhooks', 'email']);
    assert.equal(v.baaState, 'none');
    const withEp = await registry.addEndpoint({
      vendor: 'example notify',
      host: 'Hooks.Example.COM.',
      port: 443,
      protocol: 'https',
    });
    assert.deepEqual(
      withEp.endpoints.map((e) => [e.host, e.port, e.protocol, e.allowPrivate]),
      [['hooks.example.com', 443, 'https', false]],
    );
    const withBaa = await registry.recordBaa({
      vendor: v.vendorId,
      executedAt: day(-100),
      expiresOn: day(365),
      documentSha256: SHA,
    });
    assert.equal(withBaa.baaState, 'active');
    assert.equal(withBaa.expiresInDays, 365);
    assert.equal(withBaa.baa?.documentSha256, SHA);
    const events = (await auditEvents(auditDb)).slice(before);
    assert.deepEqual(
      events.map((e) => [e.action, e.code, e.resource?.type]),
      [
        ['admin', 'vendor.created', 'Vendor'],
        ['admin', 'vendor.endpoint_added', 'VendorEndpoint'],
        ['admin', 'vendor.baa_recorded', 'VendorBaa'],
      ],
    );
    assert.equal(events[0]!.resource?.id, v.vendorId);
    // list: infrastructure from the configuration first, then registered vendors.
    const list = await registry.list();
    assert.deepEqual(
      list.map((x) => [x.kind, x.name, x.phiClass]),
      [
        ['infrastructure', 'key management service', 'none'],
        ['infrastructure', 'SIEM', 'deidentified'],
        ['infrastructure', 'audit witness 1', 'none'],
        ['vendor', 'Example Notify', 'full'],
      ],
    );
    assert.equal(list[0]!.endpoints[0]!.host, 'kms.eu-west-1.amazonaws.com');
  });

  test('bad input is refused naming each field; nothing is written', async () => {
    const before = (await auditEvents(auditDb)).length;
    const invalid = async (p: Promise<unknown>, fields: string[]) =>
      assert.rejects(p, (e: unknown) => {
        assert.ok(isCustosError(e) && e.code === 'VENDOR_INVALID', String(e));
        assert.deepEqual([...new Set(e.details.map((d) => d.expression))].sort(), fields.sort());
        return true;
      });
    await invalid(registry.addVendor({ name: '', phiClass: 'some' }), ['name', 'phiClass']);
    await invalid(registry.addVendor({ name: 'X', phiClass: 'full', services: ['no spaces allowed'] }), [
      'services',
    ]);
    await invalid(
      registry.addEndpoint({
        vendor: 'Example Notify',
        host: 'https://a.example.com/x',
        port: 0,
        protocol: 'gopher',
      }),
      ['host', 'port', 'protocol'],
    );
    // Private addresses and plain http need allowPrivate.
    await invalid(
      registry.addEndpoint({
        vendor: 'Example Notify',
        host: '169.254.169.254',
        port: 443,
        protocol: 'https',
      }),
      ['host'],
    );
    await invalid(
      registry.addEndpoint({ vendor: 'Example Notify', host: '2130706433', port: 443, protocol: 'https' }),
      ['host'],
    );
    await invalid(
      registry.addEndpoint({ vendor: 'Example Notify', host: 'a.example.com', port: 80, protocol: 'http' }),
      ['protocol'],
    );
    await invalid(
      registry.recordBaa({ vendor: 'Example Notify', executedAt: '2024-02-30', expiresOn: 'soon' }),
      ['executedAt', 'expiresOn', 'documentSha256'],
    );
    await invalid(
      registry.recordBaa({
        vendor: 'Example Notify',
        executedAt: day(30),
        expiresOn: day(400),
        documentSha256: SHA,
      }),
      ['executedAt'],
    );
    await invalid(
      registry.recordBaa({
        vendor: 'Example Notify',
        executedAt: day(-10),
        expiresOn: day(-20),
        documentSha256: SHA,
      }),
      ['expiresOn'],
    );
    await assert.rejects(
      registry.addVendor({ name: 'example NOTIFY', phiClass: 'none' }),
      (e: unknown) => isCustosError(e) && e.code === 'VENDOR_CONFLICT',
    );
    await assert.rejects(
      registry.addEndpoint({
        vendor: 'Example Notify',
        host: 'hooks.example.com',
        port: 443,
        protocol: 'https',
      }),
      (e: unknown) => isCustosError(e) && e.code === 'VENDOR_CONFLICT',
    );
    await assert.rejects(
      registry.addEndpoint({ vendor: 'nobody', host: 'b.example.com', port: 443, protocol: 'https' }),
      (e: unknown) => isCustosError(e) && e.code === 'VENDOR_NOT_FOUND',
    );
    await assert.rejects(
      registry.addEndpoint({ vendor: 'SIEM', host: 'b.example.com', port: 443, protocol: 'https' }),
      (e: unknown) => isCustosError(e) && e.code === 'VENDOR_INVALID',
    );
    assert.equal((await auditEvents(auditDb)).length, before, 'nothing audited: nothing written');
  });

  test('BAA expiry: warned from 30 days ahead (log and expiresInDays), blocked on the day', async () => {
    const now = new Date('2026-01-01T12:00:00Z');
    const baa = (expiresOn: string) => ({
      baaId: 'b',
      executed: true,
      executedAt: '2025-01-01',
      expiresOn,
      recordedBy: 'x',
      recordedAt: '',
    });
    assert.deepEqual(baaStateOf(baa('2026-03-02'), now), { baaState: 'active', expiresInDays: 60 });
    assert.deepEqual(baaStateOf(baa('2026-01-31'), now), { baaState: 'expiring', expiresInDays: 30 });
    assert.deepEqual(baaStateOf(baa('2026-01-02'), now), { baaState: 'expiring', expiresInDays: 1 });
    assert.deepEqual(baaStateOf(baa('2026-01-01'), now), { baaState: 'expired', expiresInDays: 0 });
    assert.deepEqual(baaStateOf({ ...baa('2027-01-01'), executed: false }, now), {
      baaState: 'not-executed',
    });

    const v = await registry.addVendor({ name: 'Soon Expiring', phiClass: 'limited' });
    const r = await registry.recordBaa({
      vendor: v.vendorId,
      executedAt: day(-300),
      expiresOn: day(10),
      documentSha256: SHA,
    });
    assert.equal(r.baaState, 'expiring');
    assert.equal(r.expiresInDays, 10);
    await registry.warnExpiring();
    const warn = logged.events.find(
      (e) => e.event === 'vendor.baa_expiring' && e.fields?.resourceId === v.vendorId,
    );
    assert.equal(warn?.level, 'warn');
    assert.equal(warn?.fields?.count, 10);
    // Once a day per vendor, not at every call.
    const n = logged.events.length;
    await registry.warnExpiring();
    assert.equal(logged.events.length, n);
  });

  describe('the gateway on the registry', () => {
    let server: http.Server;
    let port: number;
    let hits = 0;
    let gateway: EgressGateway;
    let vendor: Vendor;
    before(async () => {
      server = http.createServer((_q, res) => {
        hits++;
        res.end('ok');
      });
      port = await new Promise<number>((r) =>
        server.listen(0, '127.0.0.1', () => r((server.address() as AddressInfo).port)),
      );
      gateway = new EgressGateway({ destinations: registry, audit, onAllowed: (d) => registry.warnOne(d) });
      vendor = await registry.addVendor({ name: 'Loopback Hook', phiClass: 'full' });
      await registry.addEndpoint({
        vendor: vendor.vendorId,
        host: '127.0.0.1',
        port,
        protocol: 'http',
        allowPrivate: true,
      });
    });
    after(async () => {
      await gateway.close();
      await new Promise((r) => server.close(r));
    });

    const send = (dataClass: 'full' | 'none') =>
      gateway.fetch({ purpose: 'webhook', dataClass, url: `http://127.0.0.1:${port}/hook?patient=pat-1` });

    test('no BAA, an expired one, then a renewal: PHI refused, refused, sent; each attempt audited', async () => {
      const before = (await auditEvents(auditDb)).length;
      await assert.rejects(
        send('full'),
        (e: unknown) => isCustosError(e) && e.code === 'EGRESS_BAA_INACTIVE',
      );
      await registry.recordBaa({
        vendor: vendor.vendorId,
        executedAt: day(-800),
        expiresOn: day(0),
        documentSha256: SHA,
      });
      await assert.rejects(send('full'), (e: unknown) => isCustosError(e) && e.code === 'EGRESS_BAA_EXPIRED');
      assert.equal(hits, 0, 'nothing sent');
      assert.equal((await send('none')).status, 200, 'data without PHI still goes');
      await registry.recordBaa({
        vendor: vendor.vendorId,
        executedAt: day(-1),
        expiresOn: day(730),
        documentSha256: SHA,
      });
      assert.equal((await send('full')).status, 200);
      assert.equal(hits, 2);
      const events = (await auditEvents(auditDb)).slice(before).filter((e) => e.action === 'egress');
      assert.deepEqual(
        events.map((e) => [e.outcome, e.code, e.egress?.dataClass, e.egress?.vendorId]),
        [
          ['refused', 'EGRESS_BAA_INACTIVE', 'full', vendor.vendorId],
          ['refused', 'EGRESS_BAA_EXPIRED', 'full', vendor.vendorId],
          ['success', 'egress.allowed', 'none', vendor.vendorId],
          ['success', 'egress.allowed', 'full', vendor.vendorId],
        ],
      );
      assert.ok(!JSON.stringify(events).includes('/hook'), 'no path in the audit log');
    });
  });
});

describe('custos vendor (storage opened directly)', () => {
  let storage: TestStorage;
  let doc: string;
  before(async () => {
    storage = await createTestStorage();
    doc = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'custos-vendor-doc-')), 'baa.pdf');
    fs.writeFileSync(doc, 'synthetic signed BAA for tests');
  });
  after(async () => {
    await storage?.cleanup();
    fs.rmSync(path.dirname(doc), { recursive: true, force: true });
  });

  test('add, endpoint, baa, list, show: --json prints one document; usage errors exit 2', async () => {
    const env = storage.env;
    const add = await runCustos(
      ['vendor', 'add', '--name', 'CLI Hooks', '--phi-class', 'limited', '--services', 'webhooks', '--json'],
      env,
    );
    assert.equal(add.code, 0, add.stderr);
    const v = JSON.parse(add.stdout) as Vendor;
    assert.equal(v.phiClass, 'limited');
    const ep = await runCustos(
      [
        'vendor',
        'endpoint',
        '--vendor',
        'CLI Hooks',
        '--host',
        'hooks.example.com',
        '--port',
        '8443',
        '--json',
      ],
      env,
    );
    assert.equal(ep.code, 0, ep.stderr);
    assert.equal((JSON.parse(ep.stdout) as Vendor).endpoints[0]!.protocol, 'https');
    const baa = await runCustos(
      [
        'vendor',
        'baa',
        '--vendor',
        v.vendorId,
        '--executed-at',
        day(-5),
        '--expires',
        day(20),
        '--document',
        doc,
        '--json',
      ],
      env,
    );
    assert.equal(baa.code, 0, baa.stderr);
    const b = JSON.parse(baa.stdout) as Vendor;
    assert.equal(b.baaState, 'expiring');
    assert.equal(b.expiresInDays, 20);
    assert.match(b.baa!.documentSha256!, /^[0-9a-f]{64}$/);
    const list = await runCustos(['vendor', 'list', '--json'], env);
    assert.equal(list.code, 0, list.stderr);
    assert.deepEqual(
      (JSON.parse(list.stdout) as { vendors: Vendor[] }).vendors.map((x) => [x.name, x.expiresInDays]),
      [['CLI Hooks', 20]],
    );
    const show = await runCustos(['vendor', 'show', '--vendor', 'CLI Hooks'], env);
    assert.equal(show.code, 0, show.stderr);
    assert.match(show.stdout, /WARNING: the BAA expires in 20 days/);
    for (const args of [
      ['vendor', 'add', '--name', 'X', '--phi-class', 'everything'],
      ['vendor', 'endpoint', '--vendor', 'CLI Hooks', '--host', '127.0.0.1', '--port', '443'],
      ['vendor', 'endpoint', '--vendor', 'CLI Hooks', '--host', 'x.example.com', '--port', 'eighty'],
      [
        'vendor',
        'baa',
        '--vendor',
        'CLI Hooks',
        '--executed-at',
        day(-1),
        '--expires',
        day(9),
        '--document',
        '/nonexistent',
      ],
      ['vendor', 'show'],
      ['vendor', 'show', '--vendor', 'nobody'],
    ]) {
      const r = await runCustos(args, env);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stdout, '');
    }
  });
});
