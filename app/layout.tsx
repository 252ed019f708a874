import type { ReactNode } from 'react';
import './styles.css';

export const metadata = { title: 'Gatehouse demo', description: 'A single-page app behind the Gatehouse BFF' };

export default function RootLayout({ children }: { children: ReactNode }) {
  return (
    <html lang="en">
      <body>{children}</body>
    </html>
  );
}
