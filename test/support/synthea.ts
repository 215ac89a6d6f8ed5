import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { HTEST } from './harness.ts';

/** ../shared/data/synthea-r4: Synthea transaction bundles (synthetic people), read where they are. */
export const SYNTHEA_DIR = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  '..',
  '..',
  '..',
  'shared',
  'data',
  'synthea-r4',
);

/** Labels every entry HTEST, as our importers do for sandbox projects (Synthea data is unlabelled). */
export function labelled<T extends { entry: any[] }>(bundle: T): T {
  for (const e of bundle.entry) {
    e.resource.meta = { ...(e.resource.meta ?? {}), security: [...(e.resource.meta?.security ?? []), HTEST] };
  }
  return bundle;
}
