import { Demo } from './demo.tsx';

export default function Page() {
  return <Demo />;
}
