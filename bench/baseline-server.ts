/**
 * The BASELINE for bench/http-bench.ts: a bare node:http server (no framework, no auth, no purpose
 * of use, no validation, no Provenance, no audit, no logging) over the same `resource` table that
 * the Custos run filled, through the same driver (pg.Pool with Custos' pool size for a PostgreSQL
 * server, PGlite for embedded storage). Started as a child process, like the Custos server.
 *
 *   BASELINE_PROJECT_ID=… BASELINE_DATABASE_URL=postgres://… node --import tsx bench/baseline-server.ts
 *   BASELINE_PROJECT_ID=… BASELINE_PGLITE_DIR=<dataDir>/resources node --import tsx bench/baseline-server.ts
 *
 * Routes (the body and headers match what Custos returns):
 *   GET  /fhir/R4/:type/:id          one row by primary key, the same columns Custos selects
 *   POST /fhir/R4/:type              one bare INSERT into `resource` (autocommit)
 *   POST /versioned/fhir/R4/:type    INSERT resource_version + INSERT resource in one transaction:
 *                                    the least a versioned FHIR store must write per create
 * Prints `{"port":N}` on stdout when listening; stops on SIGTERM.
 */
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { PGlite } from '@electric-sql/pglite';

interface Db {
  query(sql: string, params: unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
  transaction(statements: { sql: string; params: unknown[] }[]): Promise<void>;
  close(): Promise<void>;
}

async function openDb(): Promise<Db> {
  const url = process.env.BASELINE_DATABASE_URL;
  if (url) {
    const pool = new pg.Pool({ connectionString: url, max: 10 }); // PgDriver's default pool size
    pool.on('error', () => {});
    return {
      query: async (sql, params) => ({
        rows: (await pool.query(sql, params)).rows as Record<string, unknown>[],
      }),
      async transaction(statements) {
        const c = await pool.connect();
        try {
          await c.query('BEGIN');
          for (const s of statements) await c.query(s.sql, s.params);
          await c.query('COMMIT');
        } catch (e) {
          await c.query('ROLLBACK').catch(() => {});
          throw e;
        } finally {
          c.release();
        }
      },
      close: () => pool.end(),
    };
  }
  const dir = process.env.BASELINE_PGLITE_DIR;
  if (!dir) throw new Error('set BASELINE_DATABASE_URL or BASELINE_PGLITE_DIR');
  const db = new PGlite(dir);
  await db.waitReady;
  return {
    query: async (sql, params) => ({ rows: (await db.query<Record<string, unknown>>(sql, params)).rows }),
    async transaction(statements) {
      await db.transaction(async (tx) => {
        for (const s of statements) await tx.query(s.sql, s.params);
      });
    },
    close: () => db.close(),
  };
}

const projectId = process.env.BASELINE_PROJECT_ID;
if (!projectId) throw new Error('set BASELINE_PROJECT_ID');
const db = await openDb();
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
// The same columns as src/store/resource-store.ts selects for a read.
const READ_SQL = `SELECT resource_type, id, version_id, last_updated, deleted, content::text AS json, patients
  FROM resource WHERE project_id = $1 AND resource_type = $2 AND id = $3`;
const INSERT_RESOURCE = `INSERT INTO resource (project_id, resource_type, id, version_id, last_updated, deleted, content, patients)
  VALUES ($1, $2, $3, 1, $4, false, $5::jsonb, $6)`;
const INSERT_VERSION = `INSERT INTO resource_version (project_id, resource_type, id, version_id, last_updated, deleted, method, content, patients)
  VALUES ($1, $2, $3, 1, $4, false, 'create', $5::jsonb, $6)`;

function send(
  res: http.ServerResponse,
  status: number,
  body?: string,
  headers: Record<string, string> = {},
): void {
  res.writeHead(status, { 'content-type': FHIR_JSON, ...headers });
  res.end(body);
}

async function readBody(req: http.IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  const url = req.url ?? '/';
  const versioned = url.startsWith('/versioned/');
  const parts = (versioned ? url.slice('/versioned'.length) : url).split('/').filter(Boolean); // fhir, R4, type, id
  const type = parts[2];
  if (req.method === 'GET' && parts.length === 4 && type) {
    const { rows } = await db.query(READ_SQL, [projectId, type, parts[3]]);
    const row = rows[0] as
      { version_id: number; last_updated: string | Date; deleted: boolean; json: string | null } | undefined;
    if (!row || row.deleted || row.json === null)
      return send(res, 404, '{"resourceType":"OperationOutcome"}');
    const lastUpdated = row.last_updated instanceof Date ? row.last_updated : new Date(row.last_updated);
    return send(res, 200, row.json, {
      etag: `W/"${row.version_id}"`,
      'last-modified': lastUpdated.toUTCString(),
    });
  }
  if (req.method === 'POST' && parts.length === 3 && type) {
    const resource = JSON.parse(await readBody(req)) as Record<string, unknown>;
    const id = randomUUID();
    const lastUpdated = new Date().toISOString();
    const json = JSON.stringify({
      ...resource,
      id,
      meta: { ...(resource.meta as object | undefined), versionId: '1', lastUpdated },
    });
    const params = [projectId, type, id, lastUpdated, json, type === 'Patient' ? [id] : []];
    if (versioned) {
      await db.transaction([
        { sql: INSERT_VERSION, params },
        { sql: INSERT_RESOURCE, params },
      ]);
    } else {
      await db.query(INSERT_RESOURCE, params);
    }
    return send(res, 201, json, { etag: 'W/"1"', location: `/fhir/R4/${type}/${id}/_history/1` });
  }
  return send(res, 404, '{"resourceType":"OperationOutcome"}');
}

const server = http.createServer((req, res) => {
  handle(req, res).catch(() => {
    if (!res.headersSent) send(res, 500, '{"resourceType":"OperationOutcome"}');
    else res.destroy();
  });
});
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(`${JSON.stringify({ port: typeof addr === 'object' && addr ? addr.port : 0 })}\n`);
});
process.once('SIGTERM', () => {
  server.closeAllConnections();
  server.close(() => {
    void db.close().finally(() => process.exit(0));
  });
});
